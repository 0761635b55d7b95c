"""promptkd: unsupervised prompt distillation of a large CLIP teacher into a small CLIP student.

    import promptkd
    clf = promptkd.load("runs/pets/student")   # or a model folder, hf-hub:ORG/NAME, a .safetensors or .onnx
    clf.predict(["cat.jpg"], topk=3)            # [[(class, probability), ...]]

Importing the package imports no torch; `load` does when it runs (see promptkd.sharing.load).
"""

from promptkd.errors import PromptKDError

__version__ = "0.1.0"
__all__ = ["PromptKDError", "__version__", "load"]


def load(model, **kwargs):
    """A student classifier from a run folder, a student or one-file student file, an ONNX export, a
    model folder or `hf-hub:ORG/NAME`: `predict(images, topk)`, `classes`, `preprocess(images)` and
    `image_features(images)`. Keywords: class_vectors, device, allow_other_teacher, revision."""
    from promptkd.sharing import load as load_any

    return load_any(model, **kwargs)
