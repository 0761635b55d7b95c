"""Seeded few-shot and base/novel class sampling that picks exactly what Dassl/CoOp pick.

Same seed, same input order -> same images as the official code, so teachers trained here and
there see the same shots, and results can be compared split for split.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from promptkd.data.dataset import Item
from promptkd.errors import PromptKDError

SUBSETS = ("all", "base", "novel")


def set_random_seed(seed: int) -> None:
    """Dassl's set_random_seed: python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generate_fewshot(items: Sequence[Item], num_shots: int, rng=random) -> list[Item]:
    """Dassl's generate_fewshot_dataset: group by label in order of first appearance, then
    `rng.sample(group, K)` per group, or the whole group when it has fewer than K items."""
    if num_shots < 1:
        return list(items)
    groups: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    out: list[Item] = []
    for group in groups.values():
        out.extend(rng.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def fewshot_for_seed(
    train: Sequence[Item], val: Sequence[Item] | None, num_shots: int, seed: int
) -> tuple[list[Item], list[Item] | None]:
    """The official order for one seed: seed, K shots of train, then min(K, 4) shots of val.

    Uses a private random.Random(seed), which yields the same draws as random.seed(seed) on the
    global generator right after Dassl's set_random_seed, without disturbing global state.
    """
    rng = random.Random(seed)
    train = generate_fewshot(train, num_shots, rng)
    if val is not None:
        val = generate_fewshot(val, min(num_shots, 4), rng)
    return train, val


def split_labels(items: Sequence[Item], subsample: str) -> list[int]:
    """The labels of a subset: sorted labels of `items`, base = first ceil(n/2), novel = the rest."""
    if subsample == "new":
        subsample = "novel"
    if subsample not in SUBSETS:
        raise PromptKDError(f"subsample must be one of {SUBSETS}, got {subsample!r}")
    labels = sorted({item.label for item in items})
    m = math.ceil(len(labels) / 2)
    return {"all": labels, "base": labels[:m], "novel": labels[m:]}[subsample]


def subsample_classes(*splits: Sequence[Item], subsample: str = "all") -> tuple[list[Item], ...]:
    """CoOp's subsample_classes: classes from the sorted labels of the first split; "base"/"novel"
    keep their items relabelled 0..len-1 in label order. "all" returns the splits unchanged."""
    selected = split_labels(splits[0], subsample)
    if subsample == "all":
        return tuple(list(s) for s in splits)
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([Item(it.path, relabel[it.label]) for it in s if it.label in relabel] for s in splits)
