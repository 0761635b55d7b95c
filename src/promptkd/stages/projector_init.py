"""Start the student's projector near its own zero-shot instead of at chance.

A random projector maps the student's image features to noise in the teacher's space (HM 9.9 on the
demo domain before distillation), and a few unlabelled images per class cannot bring the student
back above its zero-shot. The student's CLIP already aligns its images with its own text, so a
projector that carries the student's *text* features onto the teacher's carries its images too:
  1. pairs: every class name in PromptSRC's 60 ImageNet templates, encoded by the student's and the
     teacher's plain text towers;
  2. fit: Adam on cross-entropy of the projected student text over the class vectors (each text is
     its class) plus the cosine distance to the paired teacher text;
  3. BatchNorm: the statistics of text features are not those of image features, so the projector's
     BatchNorm statistics are recomputed on (up to MAX_BN_IMAGES of) the unlabelled training images.
  4. distillation then trains the fitted projector at PROJECTOR_LR_SCALE of the learning rate (a
     gradient hook): at the full rate of a random start, the first epoch after warm-up threw it back
     to chance on 32 images per class (toy domain: HM 8 on val), and 240 steps did not recover.
No label is read at any step. docs/distill.md ("Small sets") reports what it measures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from promptkd.data.dataset import Item
    from promptkd.models.wrappers import Student, Teacher

log = logging.getLogger(__name__)

FIT_STEPS = 400
FIT_LR = 1e-3
FIT_BATCH = 2048  # text pairs per step (all of them when fewer)
MAX_BN_IMAGES = 2048
PROJECTOR_LR_SCALE = 0.1


def _text_features(clip, texts: list[str], chunk: int = 256) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    device = next((p.device for n, p in clip.model.named_parameters() if not n.startswith("visual.")), "cpu")
    with torch.no_grad():
        feats = [clip.model.encode_text(clip.tokenizer(texts[i: i + chunk]).to(device)).float().cpu()
                 for i in range(0, len(texts), chunk)]
    return F.normalize(torch.cat(feats), dim=-1)


def text_pairs(student: Student, teacher: Teacher, classnames: Sequence[str],
               templates: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student text features, teacher text features, class index) for every class in every template."""
    import torch

    from promptkd.stages.templates import IMAGENET_TEMPLATES

    names = [c.replace("_", " ") for c in classnames]
    texts = [t.format(n) for t in (templates or IMAGENET_TEMPLATES) for n in names]
    labels = torch.arange(len(names)).repeat(len(texts) // len(names))
    return _text_features(student.clip, texts), _text_features(teacher.clip, texts), labels


def fit_projector_on_text(student: Student, teacher: Teacher, classifier: torch.Tensor, classnames: Sequence[str],
                          images: Sequence[Item], *, device, seed: int = 0, steps: int = FIT_STEPS,
                          batch_size: int = 100, num_workers: int = 0) -> dict:
    """Fit `student.projector` on paired text features, then recompute its BatchNorm statistics on
    `images` (unlabelled). Returns the last fit losses (logged)."""
    import torch
    import torch.nn.functional as F

    s_text, t_text, labels = text_pairs(student, teacher, classnames)
    s_text, t_text, labels = s_text.to(device), t_text.to(device), labels.to(device)
    W = classifier.to(device, torch.float32)
    proj = student.projector
    proj.train()
    opt = torch.optim.Adam(proj.parameters(), lr=FIT_LR)
    gen = torch.Generator().manual_seed(seed)
    ce = cos = torch.zeros(())
    for _ in range(steps):
        idx = torch.randperm(len(labels), generator=gen)[:FIT_BATCH].to(device)
        z = F.normalize(proj(s_text[idx]), dim=-1)
        ce = F.cross_entropy(student.logit_scale.float() * z @ W.T, labels[idx])
        cos = (1 - (z * t_text[idx]).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        (ce + cos).backward()
        opt.step()
    recompute_bn_stats(student, images, device=device, seed=seed, batch_size=batch_size, num_workers=num_workers)
    out = {"cross_entropy": ce.detach().item(), "cosine_distance": cos.detach().item(), "pairs": len(labels)}
    log.info("projector fitted on %d text pairs (cross-entropy %.3f, cosine distance %.3f)", len(labels),
             out["cross_entropy"], out["cosine_distance"])
    return out


def recompute_bn_stats(student: Student, images: Sequence[Item], *, device, seed: int = 0, batch_size: int = 100,
                       num_workers: int = 0) -> None:
    """The projector's BatchNorm running statistics as the plain average over the images' batches."""
    import torch
    from torch.utils.data import DataLoader

    from promptkd.data.dataset import ImageDataset
    from promptkd.data.transforms import transforms_for

    items = list(images)
    if len(items) > MAX_BN_IMAGES:
        keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:MAX_BN_IMAGES]
        items = [items[i] for i in sorted(keep.tolist())]
    if not items:
        return
    bn = student.projector.bn
    momentum = bn.momentum
    bn.reset_running_stats()
    bn.momentum = None  # cumulative average over the batches
    bn.train()
    loader = DataLoader(ImageDataset(items, transforms_for(student.clip.preprocess_cfg)[1], train=False),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        with torch.no_grad():
            for x, _, _ in loader:
                if len(x) > 1:  # BatchNorm needs two values per channel
                    bn(student.projector.fc1(student.image(x.to(device))))
    finally:
        bn.momentum = momentum


def slow_down_projector(student: Student, scale: float = PROJECTOR_LR_SCALE) -> None:
    """Scale the projector's gradients by `scale`: with SGD (momentum included) it then moves at
    `scale` times the learning rate, while the prompts keep the full rate. Set once per student."""
    if getattr(student.projector, "_promptkd_slowed", None) is not None:
        return
    for p in student.projector.parameters():
        p.register_hook(lambda g: g * scale)
    student.projector._promptkd_slowed = scale
