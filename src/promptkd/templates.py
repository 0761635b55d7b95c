"""Prompt templates for zero-shot class vectors: one template, a named set, or a file.

- `imagenet80`: CLIP's 80 ImageNet prompt-engineering templates, in CLIP's order.
- `dataset`: the one template CoOp (and the official PromptKD code) uses for a benchmark, e.g.
  "a photo of a {}, a type of pet." for OxfordPets; "a photo of a {}." for the others it has none for.
- a text containing `{}`: that one template; anything else is a file with one template per line.

Several templates are averaged as CLIP does: each template's text features normalised, their mean
over templates, normalised again (promptkd.models.teachers.template_class_vectors). No torch here,
so the CLI can check a template choice before any model loads.
"""

from __future__ import annotations

from pathlib import Path

from promptkd.errors import PromptKDError

DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS = ("imagenet80", "dataset")

CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# CoOp's per-dataset template (the official PromptKD code reads the same table); benchmarks not
# listed use DEFAULT_TEMPLATE.
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Food101": "a photo of {}, a type of food.",
    "UCF101": "a photo of a person doing {}.",
}


def dataset_template(dataset: str | None) -> str:
    """The CoOp template of a benchmark; a folder or no dataset is one line (the set needs a name)."""
    from promptkd.data.registry import canonical_name

    if not dataset or ":" in dataset:
        raise PromptKDError("--templates dataset needs a benchmark --dataset (e.g. OxfordPets); for your own "
                            "classes give one template with {} or a file of templates")
    return DATASET_TEMPLATES.get(canonical_name(dataset), DEFAULT_TEMPLATE)


def resolve_templates(spec: str | list[str] | tuple[str, ...] | None, dataset: str | None = None) -> list[str]:
    """The templates a choice names (None: the default template); each must hold one `{}`."""
    if spec is None:
        return [DEFAULT_TEMPLATE]
    if isinstance(spec, (list, tuple)):
        templates = list(spec)
    elif spec == "imagenet80":
        templates = list(CLIP_IMAGENET_TEMPLATES)
    elif spec == "dataset":
        templates = [dataset_template(dataset)]
    elif "{}" in spec:
        templates = [spec]
    else:
        path = Path(spec)
        if not path.is_file():
            raise PromptKDError(f"--templates {spec}: not {', '.join(TEMPLATE_SETS)}, a template with {{}} or a "
                                "file of templates")
        templates = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not templates:
            raise PromptKDError(f"--templates {spec}: the file holds no templates")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise PromptKDError(f"templates must hold exactly one {{}} for the class name, got {bad[0]!r}")
    return templates
