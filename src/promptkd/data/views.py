"""Datasets that render more than one input per image on top of one `ImageDataset` (the student's
view plus the teacher's rendering or cached features). No torch import: stage modules subclass it
at import time, and the CLI imports stages to answer `--help`."""

from __future__ import annotations


class ViewsOverImages:
    """Epoch, bad-image policy, unreadable count and length come from `self.base`, the ImageDataset
    whose random views the subclass renders (so substitutes and resume behave as in ImageDataset)."""

    base = None  # an ImageDataset, set by the subclass

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def set_on_bad_image(self, policy: str) -> None:
        self.base.set_on_bad_image(policy)

    def unreadable_count(self) -> int:
        return self.base.unreadable_count()

    def __len__(self) -> int:
        return len(self.base)
