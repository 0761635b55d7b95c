"""promptkd: unsupervised prompt distillation of a large CLIP teacher into a small CLIP student.

    import promptkd
    clf = promptkd.load("runs/pets/student")   # or a model folder, hf-hub:ORG/NAME, a .safetensors or .onnx
    clf.predict(["cat.jpg"], topk=3)            # [[(class, probability), ...]]

Importing the package imports no torch: `load` (promptkd.sharing.load) is imported on first use.
"""

from promptkd.errors import PromptKDError
from promptkd.lazy import lazy_attributes
from promptkd.models.sources import register_model_source

__version__ = "0.1.0"
__all__ = ["PromptKDError", "__version__", "load"]
__getattr__ = lazy_attributes(__name__, {"load": "promptkd.sharing"})

# The toy world's CLIPs (`toy-teacher`, `toy-student`) load through `load_clip` like any other. models/
# knows nothing of the toy world: the registration lives here, the one module every way into promptkd
# runs first, by name, so it imports neither torch nor the toy package (models/sources.py says why).
register_model_source("toy-", "promptkd.toy.models:load_toy_clip")
