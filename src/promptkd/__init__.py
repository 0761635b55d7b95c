"""promptkd: unsupervised prompt distillation of a large CLIP teacher into a small CLIP student.

    import promptkd
    clf = promptkd.load("runs/pets/student")   # or a model folder, hf-hub:ORG/NAME, a .safetensors or .onnx
    clf.predict(["cat.jpg"], topk=3)            # [[(class, probability), ...]]

Importing the package imports no torch: `load` (promptkd.sharing.load) is imported on first use.
"""

from promptkd.errors import PromptKDError
from promptkd.lazy import lazy_attributes

__version__ = "0.1.0"
__all__ = ["PromptKDError", "__version__", "load"]
__getattr__ = lazy_attributes(__name__, {"load": "promptkd.sharing"})
