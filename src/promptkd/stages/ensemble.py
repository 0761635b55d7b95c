"""Distillation from several teachers: one view per image shared by all of them, and their scores.

Every teacher must see the crop the student sees. Without a cache the view is drawn as for one
teacher; with caches, the views are replayed from the first cache, and every other cache must hold
the same views (same images, `--views` and `--view-seed`). Online teachers render that view in their
own input format when it differs from the student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from promptkd.data.views import ViewsOverImages
from promptkd.errors import PromptKDError

if TYPE_CHECKING:
    import torch

    from promptkd.data.protocols import Protocol


class EnsembleViews(ViewsOverImages):
    """(student view, one input per teacher, label, index) for DataLoader. A teacher's input is its
    cached feature of the view ("cache", TeacherCache), the view rendered with its transform
    ("online", TrainTransform), or an empty tensor when it reads the student's tensor ("online", None)."""

    def __init__(self, items, student_tf, parts: Sequence[tuple[str, object]], seed: int):
        import torch

        from promptkd.data.dataset import ImageDataset
        from promptkd.stages.cache import CachedViewDataset

        self.base = ImageDataset(items, student_tf, seed=seed, train=True)
        self.parts = list(parts)
        caches = [c for kind, c in self.parts if kind == "cache"]
        self.replay = CachedViewDataset(items, student_tf, caches[0], seed) if caches else None
        for c in caches[1:]:
            if c.identity() != caches[0].identity():
                raise PromptKDError(f"teacher caches {caches[0].dir} and {c.dir} hold different views (build them "
                                    "over the same images with the same --views and --view-seed)")
        self.empty = torch.zeros(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.replay is not None:
            self.replay.set_epoch(epoch)

    def _load(self, index: int, j: int):
        from promptkd.data.dataset import ImageSource

        source = ImageSource(self.base.items[j][0])
        tf = self.base.transform
        if self.replay is not None:
            k = self.replay.view_index(j)
            view = self.replay.cache.view(j, k)
            x_s = tf.render(source, view)
        else:
            x_s, view = tf.draw(source, self.base.generator_for(index))
        inputs = []
        for kind, what in self.parts:
            if kind == "cache":
                inputs.append(what.feature(j, k).float())
            else:
                inputs.append(self.empty if what is None else what.render(source, view))
        return x_s, inputs

    def __getitem__(self, index: int):
        from promptkd.data.dataset import read_item

        (x_s, inputs), label, used = read_item(self.base.items, index, self.base.on_bad_image, self.base.unreadable,
                                               load=lambda j: self._load(index, j))
        return (x_s, *inputs, label, used)


def ensemble_scores(teachers: Sequence, classifiers: Sequence[torch.Tensor], protocol: Protocol, *, temperature: float,
                    weights: Sequence[float] | None, mode: str, batch_size: int = 100, num_workers: int = 0,
                    progress: bool = True) -> tuple[dict, list[dict]]:
    """Test-split scores of the teachers' combined prediction (the argmax of their combined target),
    and each teacher's own (as evaluate_splits gives them), from one pass of each teacher over the images."""
    import torch

    from promptkd.data.transforms import transforms_for
    from promptkd.kd import class_logits, ensemble_log_probs
    from promptkd.metrics import accuracy, encode_items, harmonic_mean

    if not all(torch.isfinite(W).all() for W in classifiers):
        raise PromptKDError("the class vectors (classifier) hold non-finite values (NaN or inf)")
    out: dict[str, float] = {}
    alone: list[dict[str, float]] = [{} for _ in teachers]
    for name, split in protocol.test.items():
        items = [it for it in split.items if it.label >= 0]
        if not items:
            continue
        logits, labels = [], None
        for teacher, W, own in zip(teachers, classifiers, alone):
            device = next(teacher.parameters()).device
            feats, labels = encode_items(teacher.encode_images, items, transforms_for(teacher.clip.preprocess_cfg)[1],
                                         batch_size=batch_size, device=device, num_workers=num_workers,
                                         desc=f"ensemble {name}", progress=progress)
            w = W if split.classes is None else W[split.classes]
            own[name] = accuracy(feats, labels, w.float().cpu())
            logits.append(class_logits(feats, w.cpu(), teacher.logit_scale.cpu()))
        pred = ensemble_log_probs(logits, temperature, weights, mode).argmax(-1)
        out[name] = 100.0 * (pred == labels).float().mean().item()
    for scores in (out, *alone):
        if "base" in scores and "novel" in scores:
            scores["hm"] = harmonic_mean(scores["base"], scores["novel"])
    return out, alone
