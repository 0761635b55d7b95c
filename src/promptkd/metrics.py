"""Scoring shared by every stage: top-1 accuracy against class vectors, base/novel/HM as the paper
computes it, and the plain-CLIP zero-shot classifier used as a baseline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from promptkd.data.dataset import ImageDataset, Item
from promptkd.data.protocols import EvalSplit
from promptkd.errors import PromptKDError

log = logging.getLogger(__name__)

# Plain zero-shot template (what the official IVLP/PromptSRC prompt reads at initialisation).
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def harmonic_mean(base: float, novel: float) -> float:
    """HM of base and novel accuracy; the paper applies it to seed means (and dataset means)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@torch.no_grad()
def encode_items(
    encode: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[Item],
    transform,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels for every item, in order (test transform, no augmentation)."""
    from promptkd.logs import progress_bar

    items = list(items)
    ds = ImageDataset(items, transform, train=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, y, _ in progress_bar(loader, desc=desc, enabled=progress, leave=False):
        f = encode(images.to(device)).float()
        bad = (~torch.isfinite(f)).any(dim=-1).cpu()
        if bad.any():  # an argmax over NaN would still "classify" and report a plausible accuracy
            first = items[sum(len(b) for b in labels) + int(bad.nonzero()[0])].path
            raise PromptKDError(f"{desc}: the model gave non-finite features (NaN or inf) for {int(bad.sum())} "
                                f"image(s) (first: {first}); its weights are damaged or overflow at this precision")
        feats.append(F.normalize(f, dim=-1).cpu())
        labels.append(y)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def accuracy(features: torch.Tensor, labels: torch.Tensor, class_vectors: torch.Tensor) -> float:
    """Top-1 accuracy in percent (micro, as Dassl's evaluator)."""
    return percent(correct_count(features, labels, class_vectors), len(labels))


def correct_count(features: torch.Tensor, labels: torch.Tensor, class_vectors: torch.Tensor) -> int:
    if len(labels) == 0:
        return 0
    return int(((features @ class_vectors.to(features).T).argmax(dim=-1) == labels).sum())


def percent(correct: int, n: int) -> float:
    """100 * correct / n as a float32 mean of 0/1 hits gives it (the same from counts summed over ranks)."""
    if n == 0:
        return float("nan")
    return 100.0 * (torch.tensor(float(correct)) / n).item()


def _my_batches(items: list, batch_size: int) -> list:
    """Under torchrun: this rank's whole batches of `items` (round-robin), so that every batch is
    encoded as one process encodes it; all items in one process."""
    from promptkd.engine import distributed

    batches = range(0, len(items), batch_size)
    return [it for b in distributed.my_units(len(batches)) for it in items[batches[b]:batches[b] + batch_size]]


def evaluate_splits(encode: Callable[[torch.Tensor], torch.Tensor], classifier: torch.Tensor,
                    splits: dict[str, EvalSplit], transform, *, batch_size: int = 100,
                    device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
                    announce: str | None = None, shard: bool = False) -> dict:
    """Accuracy per split (unlabelled items skipped), plus HM when there are base and novel splits.
    `announce`: log one line per split as it finishes, under that name (bars vanish; logs keep it).

    `shard`: every torchrun rank calls this and encodes its share of the batches; the hit counts
    are summed over ranks, so each rank returns the one-process result.
    """
    from promptkd.engine import distributed

    if not torch.isfinite(classifier).all():
        raise PromptKDError("the class vectors (classifier) hold non-finite values (NaN or inf)")
    out: dict[str, float] = {}
    started = time.perf_counter()
    for name, split in splits.items():
        items = [it for it in split.items if it.label >= 0]
        if not items:
            continue
        mine = _my_batches(items, batch_size) if shard else items
        feats, labels = encode_items(encode, mine, transform, batch_size=batch_size, device=device,
                                     num_workers=num_workers, desc=f"eval {name}", progress=progress)
        w = classifier if split.classes is None else classifier[split.classes]
        hits = torch.tensor([correct_count(feats, labels, w.float().cpu()), len(labels)])
        correct, n = (distributed.sum_over_ranks(hits) if shard else hits).tolist()
        out[name] = percent(correct, n)
        if announce:
            log.info("%s: %s %.2f%% of %d images (%.1f s)", announce, name, out[name], len(items),
                     time.perf_counter() - started)
            started = time.perf_counter()
    if "base" in out and "novel" in out:
        out["hm"] = harmonic_mean(out["base"], out["novel"])
    return out


def zero_shot_scores(clip, classnames: Sequence[str], splits: dict[str, EvalSplit], *,
                     templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 100,
                     device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
                     announce: str | None = None) -> dict:
    """A plain CLIP's zero-shot scores on `splits` (evaluate_splits): its own image tower against the
    template classifier of its own text tower. The baseline a tuned or distilled model must beat.

    The text tower runs where its weights are (a student's stays on the CPU while its image tower
    trains on `device`).
    """
    from promptkd.data.transforms import transforms_for
    from promptkd.models.teachers import template_class_vectors

    text_device = next((p.device for n, p in clip.model.named_parameters() if not n.startswith("visual.")), device)
    classifier = template_class_vectors(lambda tokens: clip.model.encode_text(tokens.to(text_device)), clip.tokenizer,
                                        classnames, templates, normalize_each=False)
    return evaluate_splits(clip.model.encode_image, classifier, splits, transforms_for(clip.preprocess_cfg)[1],
                           batch_size=batch_size, device=device, num_workers=num_workers, progress=progress,
                           announce=announce)
