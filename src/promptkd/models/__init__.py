"""CLIP loading (open_clip) and our prompted encoders, which walk open_clip's blocks without forking them.

Names are resolved on first use, so that `promptkd/__init__.py` can register model sources
(models.sources) without importing torch.
"""

from promptkd.lazy import lazy_attributes

_LAZY = {
    "ClipBundle": "promptkd.models.loading",
    "DeepPrompts": "promptkd.models.prompts",
    "PromptedImageEncoder": "promptkd.models.encoders",
    "PromptedTextEncoder": "promptkd.models.encoders",
    "Projector": "promptkd.models.projector",
    "load_clip": "promptkd.models.loading",
    "text_tower": "promptkd.models.encoders",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
