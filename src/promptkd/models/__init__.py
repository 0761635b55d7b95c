"""CLIP loading (open_clip) and our prompted encoders, which walk open_clip's blocks without forking them."""

from promptkd.models.encoders import PromptedImageEncoder, PromptedTextEncoder, text_tower
from promptkd.models.loading import ClipBundle, load_clip
from promptkd.models.projector import Projector
from promptkd.models.prompts import DeepPrompts

__all__ = [
    "ClipBundle",
    "DeepPrompts",
    "PromptedImageEncoder",
    "PromptedTextEncoder",
    "Projector",
    "load_clip",
    "text_tower",
]
