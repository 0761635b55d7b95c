"""Our sampling must pick exactly what Dassl picks for the same seed and data order."""

import random

import numpy as np
import pytest
import torch

from promptkd.data import Item, fewshot_for_seed, generate_fewshot, set_random_seed, subsample_classes
from promptkd.errors import PromptKDError


def dassl_fewshot(items, k):
    """Independent statement of Dassl's rule: groups by label in order of first appearance,
    global random.sample(group, k) per group, the whole group if it is smaller than k."""
    order, groups = [], {}
    for it in items:
        if it.label not in groups:
            groups[it.label] = []
            order.append(it.label)
        groups[it.label].append(it)
    out = []
    for label in order:
        g = groups[label]
        out += random.sample(g, k) if len(g) >= k else g
    return out


def make_items(labels):
    return [Item(f"/d/{i:02d}.jpg", y) for i, y in enumerate(labels)]


# labels first appear in the order 2, 0, 1; class 1 has only 2 images (fewer than K=3)
LABELS = [2, 0, 2, 1, 0, 0, 2, 2, 0, 1, 2, 0]


def _ids(items):
    return [int(it.path[3:5]) for it in items]


@pytest.mark.parametrize(
    "k, train_ids, val_ids",
    [  # computed once with dassl_fewshot above after random.seed(1); val uses min(K, 4) shots
        (3, [2, 0, 10, 1, 8, 4, 3, 9], [7, 10, 0, 1, 8, 11, 3, 9]),
        (5, [2, 0, 10, 7, 6, 8, 11, 5, 4, 1, 3, 9], [0, 7, 10, 2, 8, 1, 5, 4, 3, 9]),
    ],
)
def test_golden_seed_1(k, train_ids, val_ids):
    train, val = fewshot_for_seed(make_items(LABELS), make_items(LABELS), num_shots=k, seed=1)
    assert _ids(train) == train_ids and _ids(val) == val_ids


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 16])
def test_official_call_order_matches_dassl(seed, k):
    rng = np.random.default_rng(seed)
    train = make_items(rng.integers(0, 5, size=40).tolist())
    val = make_items(rng.integers(0, 5, size=15).tolist())
    random.seed(seed)  # Dassl: set_random_seed, then train K shots, then val min(K, 4) shots
    expected = dassl_fewshot(train, k), dassl_fewshot(val, min(k, 4))
    state = random.getstate()
    assert fewshot_for_seed(train, val, k, seed) == expected
    assert random.getstate() == state  # our helper leaves the global generator alone


def test_generate_fewshot_with_global_random_is_dassl():
    items = make_items(LABELS * 3)
    random.seed(5)
    expected = dassl_fewshot(items, 4)
    random.seed(5)
    assert generate_fewshot(items, 4) == expected


def test_fewer_than_k_keeps_all_and_zero_shots_keeps_everything():
    items = make_items([0, 0, 1])
    assert sorted(_ids(generate_fewshot(items, 5, random.Random(0)))) == [0, 1, 2]
    assert generate_fewshot(items, 0) == items


def test_imagenet_style_no_val():
    train, val = fewshot_for_seed(make_items(LABELS), None, 2, seed=1)
    random.seed(1)
    assert train == dassl_fewshot(make_items(LABELS), 2) and val is None


def test_set_random_seed_seeds_python_numpy_torch():
    set_random_seed(3)
    a = random.random(), np.random.rand(), torch.rand(1).item()
    set_random_seed(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def coop_subsample(splits, subsample):
    """Independent statement of CoOp's rule: sorted labels of the first split, m = ceil(n/2)."""
    labels = sorted({it.label for it in splits[0]})
    m = -(-len(labels) // 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    return tuple([Item(it.path, selected.index(it.label)) for it in s if it.label in selected] for s in splits)


@pytest.mark.parametrize("n_classes", [1, 2, 5, 6])
@pytest.mark.parametrize("subsample", ["base", "novel"])
def test_subsample_classes_matches_coop(n_classes, subsample):
    train = make_items([i % n_classes for i in range(3 * n_classes)])
    test = make_items([(i * 7) % n_classes for i in range(2 * n_classes)])
    assert subsample_classes(train, test, subsample=subsample) == coop_subsample((train, test), subsample)


def test_subsample_base_novel_sizes_and_relabelling():
    train = make_items([4, 0, 3, 1, 2])  # 5 classes: base 0,1,2 (m=3), novel 3,4
    (base,) = subsample_classes(train, subsample="base")
    (novel,) = subsample_classes(train, subsample="novel")
    assert sorted(it.label for it in base) == [0, 1, 2]
    assert [(it.path, it.label) for it in novel] == [("/d/00.jpg", 1), ("/d/02.jpg", 0)]
    assert subsample_classes(train, subsample="new") == (novel,)  # CoOp's spelling
    assert subsample_classes(train, subsample="all") == (train,)
    with pytest.raises(PromptKDError, match="subsample must be one of"):
        subsample_classes(train, subsample="half")
