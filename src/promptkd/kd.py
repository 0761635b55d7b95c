"""The knowledge-distillation maths, importable without the CLI: logits against class vectors, the
KD loss, the KD-weight rule, and how the targets of several teachers are combined.

Nothing here knows about files, run folders or data loaders (benchmarks/distill_step.py and the
tests call it directly; promptkd.stages.distill re-exports the names it always had).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from promptkd.errors import PromptKDError

if TYPE_CHECKING:
    import torch

KD_REDUCTIONS = ("official", "batchmean")
# How the targets of several teachers are combined (ensemble_log_probs).
ENSEMBLE_MODES = ("mean", "confidence")

# scripts/promptkd/base2new_train.sh (comment): 200 for these, 1000 for the other eight datasets;
# xd_train.sh uses 1000 everywhere. configs/protocols/*.yaml state the same values explicitly.
OFFICIAL_KD_WEIGHT = 1000.0
OFFICIAL_KD_WEIGHT_200 = ("FGVCAircraft", "OxfordFlowers", "DescribableTextures")

# Any other dataset (a user's folder, a toy domain): the KL of one image weighs this much, whatever
# the class count: the paper's Eq. 3 with weight 1, and the official per-image weight on ImageNet.
# The official reduction divides by B*C, so the official 1000 weighs 1000/C per image: 1 on
# ImageNet, 10 on the 100-class benchmarks, but 167 on a 6-class folder, where issue #16 saw it
# wreck the student. benchmarks/kd_rule.py measures the choice (docs/distill.md, "Your own dataset").
CUSTOM_KD_PER_IMAGE = 1.0


def is_benchmark(dataset: str) -> bool:
    """One of the paper's datasets (the 11 benchmarks and the ImageNet variants), by name."""
    from promptkd.data.registry import canonical_name

    if ":" in dataset:
        return False
    try:
        canonical_name(dataset)
    except PromptKDError:
        return False
    return True


def official_kd_weight(dataset: str, protocol: str = "base2novel") -> float:
    """The KD weight the official scripts use for `dataset` under `protocol`."""
    from promptkd.data.registry import canonical_name

    if protocol != "base2novel" or not is_benchmark(dataset):
        return OFFICIAL_KD_WEIGHT
    return 200.0 if canonical_name(dataset) in OFFICIAL_KD_WEIGHT_200 else OFFICIAL_KD_WEIGHT


def default_kd_weight(dataset: str, protocol: str, n_classes: int, reduction: str = "official") -> float:
    """The KD weight when none is given. The paper's datasets: the official weight (its per-image
    value 1000/C or 200/C under `batchmean`); any other dataset: CUSTOM_KD_PER_IMAGE per image, i.e.
    that times C under the official reduction."""
    per_class = reduction == "official"
    if is_benchmark(dataset):
        weight = official_kd_weight(dataset, protocol)
        return weight if per_class else weight / max(1, n_classes)
    return CUSTOM_KD_PER_IMAGE * (max(1, n_classes) if per_class else 1)


def class_logits(features: torch.Tensor, class_vectors: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """logit_scale * normalised features @ class_vectors.T, in fp32 even under autocast.

    With a scale of 100, bf16 logits would be off by up to ~0.5; the product is tiny (B x d x C).
    """
    import torch

    with torch.autocast(features.device.type, enabled=False):
        return logit_scale.float() * features.float() @ class_vectors.to(features.device, torch.float32).T


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, temperature: float = 1.0,
            weight: float = 1.0, reduction: str = "official", *,
            teacher_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """weight * T^2 * KL(teacher || student).

    official: the summed KL divided by B*C (the official code's `kl_div(sum) / numel`);
    batchmean: the summed KL divided by B (the paper's Eq. 3), i.e. official * C.
    Computed in fp32 whatever the autocast dtype (the official code ran it in fp16).
    `teacher_log_probs` (instead of `teacher_logits`): the target's log-probabilities already at the
    temperature, e.g. several teachers' combined target (ensemble_log_probs).
    """
    import torch.nn.functional as F

    if reduction not in KD_REDUCTIONS:
        raise PromptKDError(f"kd reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_log_probs is None:
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    else:
        log_p_t = teacher_log_probs.float()
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    denom = student_logits.numel() if reduction == "official" else student_logits.shape[0]
    return weight * t * t * kl / denom


def ensemble_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    """The teachers' weights summed to 1 (None: equal); a wrong count or a non-positive sum is one line."""
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise PromptKDError(f"{len(weights)} ensemble weights for {n} teachers")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise PromptKDError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def ensemble_log_probs(logits: Sequence[torch.Tensor], temperature: float = 1.0,
                       weights: Sequence[float] | None = None, mode: str = "mean") -> torch.Tensor:
    """log of the combined target of several teachers, (B, C), at temperature T.

    mean: p = sum_i w_i softmax(z_i / T), the weights fixed (default equal).
    confidence: per image, teacher i weighs w_i * max_c p_i(c) (its confidence at T), renormalised
    over the teachers: a teacher sure of an image counts more on it than one that hesitates.
    Computed with log-sum-exp in fp32, so a target probability far below 1e-38 is still finite.
    """
    import torch
    import torch.nn.functional as F

    if mode not in ENSEMBLE_MODES:
        raise PromptKDError(f"ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
    t = float(temperature)
    log_p = torch.stack([F.log_softmax(z.float() / t, dim=-1) for z in logits])  # (K, B, C)
    w = torch.tensor(ensemble_weights(len(logits), weights), device=log_p.device).log()
    log_w = w[:, None].expand(log_p.shape[:2])  # (K, B)
    if mode == "confidence":
        log_w = log_w + log_p.max(dim=-1).values
        log_w = log_w - torch.logsumexp(log_w, dim=0, keepdim=True)
    return torch.logsumexp(log_w[..., None] + log_p, dim=0)
