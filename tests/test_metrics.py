"""Scores computed independently: top-1 accuracy and evaluate_splits against plain loops, HM by its
formula, and the base-to-novel split of the classifier (base: m-way over the first m class vectors;
novel: (n-m)-way over the rest) on crafted images where the m-way and the n-way answers differ."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tinyclip import hm, plain_top1

from promptkd.data.protocols import build_protocol
from promptkd.metrics import accuracy, evaluate_splits, harmonic_mean

NAMES = ["ant", "bee", "cat", "dog", "eel"]  # 5 classes: base = the first ceil(5/2) = 3


def test_accuracy_is_the_percent_of_rows_whose_best_class_is_the_label():
    g = torch.Generator().manual_seed(0)
    feats, vectors = torch.randn(60, 5, generator=g), torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 7, (60,), generator=g)
    want = plain_top1(feats.tolist(), labels.tolist(), vectors.tolist(), list(range(7)))
    assert 10 < want < 90
    assert accuracy(feats, labels, vectors) == pytest.approx(want, abs=1e-4)  # one row is 1.67
    assert math.isnan(accuracy(feats[:0], labels[:0], vectors))


@pytest.mark.parametrize("base, novel", [(80.0, 60.0), (100.0, 0.0), (0.0, 0.0), (33.3, 97.1)])
def test_harmonic_mean_is_2ab_over_a_plus_b(base, novel):
    want = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
    assert harmonic_mean(base, novel) == pytest.approx(want, abs=1e-12)


def _pixels(path) -> list[float]:
    """The test's own image features: the raw RGB values of a 2x2 PNG, centred, as a list."""
    return (np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).ravel() / 255 - 0.5).tolist()


def _as_tensor(img):
    """The transform handed to evaluate_splits: the same centred pixels, (H, W, 3) order kept."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy() / 255 - 0.5)


@pytest.fixture
def crafted(tmp_path):
    """A split file over 5 classes whose test images are 2x2 PNGs; class vectors in pixel space.

    Each image is a class vector plus noise, its label drawn so that the m-way (base) or (n-m)-way
    (novel) answer, the n-way answer and a wrongly sliced answer often disagree.
    """
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(5, 12))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    root = tmp_path / "img"
    split = {"train": [], "val": [], "test": []}
    for name_i, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for i in range(3):  # train/val: every class present (base2novel needs all of them)
            path = root / name / f"train{i}.png"
            Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)).save(path)
            split["train" if i < 2 else "val"].append([f"{name}/{path.name}", name_i, name])
    for k in range(80):
        near = int(rng.integers(0, 5))  # the class the pixels point at
        x = 0.5 + 0.35 * (vectors[near] + 0.9 * rng.normal(size=12)) / 1.5
        pixels = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).reshape(2, 2, 3)
        label = int(rng.integers(0, 5)) if k % 3 == 0 else (near if near < 3 else int(rng.integers(3, 5)))
        if k % 2:  # half the labels point at the other half of the classes
            label = int(rng.integers(0, 3)) if near >= 3 else int(rng.integers(3, 5))
        path = root / NAMES[label] / f"test{k}.png"
        Image.fromarray(pixels).save(path)
        split["test"].append([f"{NAMES[label]}/{path.name}", label, NAMES[label]])
    file = root / "split.json"
    file.write_text(json.dumps(split))
    return file, root, vectors, split["test"]


def test_base_and_novel_are_scored_over_their_own_class_vectors(crafted):
    file, root, vectors, test_entries = crafted
    protocol = build_protocol("base2novel", f"split:{file}")
    assert protocol.classnames == NAMES
    W = torch.tensor(vectors, dtype=torch.float32)
    got = evaluate_splits(lambda x: x.flatten(1), W, protocol.test, _as_tensor, progress=False)

    # Independent: every test image, by class *name*, scored among the base or the novel names only.
    base_names, novel_names = NAMES[:3], NAMES[3:]
    by_name = dict(zip(NAMES, vectors.tolist()))
    want, other = {}, {}
    for split, names in (("base", base_names), ("novel", novel_names)):
        entries = [e for e in test_entries if e[2] in names]
        feats = [_pixels(root / e[0]) for e in entries]
        labels = [e[2] for e in entries]
        want[split] = plain_top1(feats, labels, by_name, names)
        other[split] = {  # what a wrongly sliced classifier would give
            "n-way": plain_top1(feats, labels, by_name, NAMES),
            "first": plain_top1(feats, labels, by_name, NAMES[: len(names)]),
            "last": plain_top1(feats, labels, by_name, NAMES[-len(names):]),
        }
    # The crafted images tell the right slicing from each wrong one.
    for split in want:
        for wrong, value in other[split].items():
            if (split, wrong) not in (("base", "first"), ("novel", "last")):  # those are the right slices
                assert value != pytest.approx(want[split]), (split, wrong)
    assert set(got) == {"base", "novel", "hm"}
    assert got["base"] == pytest.approx(want["base"], abs=1e-4)  # one image is > 2 points
    assert got["novel"] == pytest.approx(want["novel"], abs=1e-4)
    assert got["hm"] == pytest.approx(hm(want["base"], want["novel"]), abs=1e-4)
