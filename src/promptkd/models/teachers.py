"""What distillation asks of a teacher: its logits for the views of a batch.

Two layers:
- a teacher *model* encodes images and class names and says who it is (`identity`): the PromptSRC
  `Teacher` (promptkd.models.wrappers) and `ZeroShotTeacher`, a plain CLIP whose class vectors come
  from prompt templates. Either can run online or fill a teacher cache.
- a teacher *target* answers "teacher logits for these views" inside the training step:
  `OnlineTargets` (the model's image tower on the views), `CachedTargets` (stored features of the
  replayed views) and `EnsembleTargets` (several of these, combined by promptkd.kd.ensemble_log_probs).

Each target reads its own part of the batch (`inputs`): the teacher's view tensor, a cached feature,
or nothing when the teacher shares the student's input tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from promptkd.kd import class_logits, ensemble_log_probs
from promptkd.models.loading import ClipBundle
from promptkd.models.wrappers import Teacher
from promptkd.templates import DEFAULT_TEMPLATE


@torch.no_grad()
def template_class_vectors(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer, classnames: Sequence[str],
                           templates: Sequence[str], chunk_size: int | None = 256, *,
                           normalize_each: bool = True) -> torch.Tensor:
    """Zero-shot class vectors from prompt templates: per template, the text feature of each class;
    their mean over templates, normalised. (n_classes, dim), fp32.

    `normalize_each` True is CLIP's zero-shot classifier (and a plain CLIP teacher's): each template's
    features are normalised before the mean, so every template counts the same. False averages the
    raw features, as PromptSRC's frozen text reference and the student's zero-shot baseline do. One
    template gives exactly the normalised feature of that text either way.
    """
    names = [c.replace("_", " ") for c in classnames]
    step = chunk_size or len(names)
    total, raw = None, []
    for template in templates:
        texts = [template.format(n) for n in names]
        feats = torch.cat([encode_text(tokenizer(texts[i: i + step])) for i in range(0, len(texts), step)]).float()
        if normalize_each:  # a running sum: one (n_classes, dim) buffer for any number of templates
            feats = F.normalize(feats, dim=-1)
            total = feats if total is None else total + feats
        else:
            raw.append(feats)
    # The running sum and the stacked mean round differently (from ~18 templates on): each mode keeps
    # the arithmetic it has always had, so classifiers and the scores made with them stay bit-identical.
    mean = total / len(templates) if normalize_each else torch.stack(raw).mean(0)
    return F.normalize(mean, dim=-1)


class ZeroShotTeacher(Teacher):
    """A plain CLIP as teacher: no prompts, class vectors from prompt templates (CLIP's zero-shot
    classifier). Its identity is its CLIP plus its templates, so class vectors made with other
    templates or another CLIP are refused like those of another PromptSRC teacher."""

    def __init__(self, clip: ClipBundle, templates: Sequence[str] = (DEFAULT_TEMPLATE,)):
        super().__init__(clip, vision_depth=0, text_depth=0)
        self.templates = list(templates)

    def encode_classnames(self, classnames: list[str], chunk_size: int | None = None) -> torch.Tensor:
        return template_class_vectors(self.text, self.text.tokenizer, classnames, self.templates, chunk_size)

    def identity(self) -> dict:
        return {**super().identity(), "templates": list(self.templates)}

    def save(self, path, **meta):
        raise TypeError("a plain CLIP teacher has no artifact: it is rebuilt from its CLIP and templates")


def image_identity(identity: dict) -> dict:
    """A teacher's identity as far as its image features go (a cache does not depend on templates)."""
    return {k: v for k, v in identity.items() if k != "templates"}


class OnlineTargets:
    """The teacher's image tower run on the views: on the student's normalised tensor when both
    share an input format (`normalize` None), else on its own view normalised by `normalize`."""

    def __init__(self, teacher: Teacher, classifier: torch.Tensor, normalize: Callable | None = None):
        self.teacher, self.classifier, self.normalize = teacher, classifier, normalize
        self.scale = teacher.logit_scale.to(classifier.device)

    def logits(self, inputs: torch.Tensor | None, x_s: torch.Tensor) -> torch.Tensor:
        images = x_s if self.normalize is None else self.normalize(inputs)
        return class_logits(self.teacher.encode_images(images), self.classifier, self.scale)


class CachedTargets:
    """Logits from the teacher features a cache stored (fp16) for the replayed view."""

    def __init__(self, classifier: torch.Tensor, logit_scale: torch.Tensor):
        self.classifier, self.scale = classifier, logit_scale.to(classifier.device)

    def logits(self, inputs: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
        return class_logits(F.normalize(inputs.float(), dim=-1), self.classifier, self.scale)


class EnsembleTargets:
    """Several teachers' targets combined into one distribution (promptkd.kd.ensemble_log_probs):
    fixed weights (default: the mean of their probabilities at the KD temperature) or weighted by
    each teacher's confidence per image."""

    def __init__(self, members: Sequence, weights: Sequence[float] | None = None, mode: str = "mean",
                 temperature: float = 1.0):
        self.members, self.weights, self.mode, self.temperature = list(members), weights, mode, temperature

    def all_logits(self, inputs: Sequence, x_s: torch.Tensor) -> list[torch.Tensor]:
        return [m.logits(i, x_s) for m, i in zip(self.members, inputs)]

    def log_probs(self, inputs: Sequence, x_s: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.all_logits(inputs, x_s), self.temperature, self.weights, self.mode)
