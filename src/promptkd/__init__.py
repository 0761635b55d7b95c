"""promptkd: unsupervised prompt distillation of a large CLIP teacher into a small CLIP student."""

from promptkd.errors import PromptKDError

__version__ = "0.1.0"
__all__ = ["PromptKDError", "__version__"]
