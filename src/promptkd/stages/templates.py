"""The 60 ImageNet prompt templates PromptSRC averages its frozen text reference over.

They are CLIP's published ImageNet prompt-engineering templates (80 in all) as PromptSRC uses
them: "a photo of a {}." first, then the first 60 of CLIP's list in its order, leaving out
"a photo of a {}." where it occurs there. `{}` is the class name (underscores become spaces).
"""

from promptkd.templates import CLIP_IMAGENET_TEMPLATES, DEFAULT_TEMPLATE

IMAGENET_TEMPLATES: tuple[str, ...] = (DEFAULT_TEMPLATE,) + tuple(
    t for t in CLIP_IMAGENET_TEMPLATES[:60] if t != DEFAULT_TEMPLATE)
