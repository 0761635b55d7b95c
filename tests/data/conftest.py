"""Tiny on-disk dataset trees in the CoOp layouts (a few classes, a few 12x10 images each)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_image(path: Path, size=(12, 10), mode="RGB") -> Path:
    """A small random image whose pixels depend on its path (so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))
    a = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


def write_json_dataset(root: Path, folder: str, image_folder: str, cfg_name: str, classnames, counts=(3, 1, 2),
                       rel=lambda c, split, i: f"{c}/{split}_{i}.jpg") -> Path:
    """<root>/<folder>/split_zhou_<cfg_name>.json plus the images it lists."""
    d = root / folder
    split = {}
    for key, k in zip(("train", "val", "test"), counts):
        split[key] = []
        for label, c in enumerate(classnames):
            for i in range(k):
                r = rel(c, key, i)
                save_image(d / image_folder / r)
                split[key].append([r, label, c])
    (d / f"split_zhou_{cfg_name}.json").write_text(json.dumps(split))
    return d


@pytest.fixture
def make_image():
    return save_image


@pytest.fixture
def make_json_dataset():
    return write_json_dataset


@pytest.fixture
def imagenet_names():
    return dict(IMAGENET)


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def pets_root(data_root):
    classes = ["abyssinian", "american_bulldog", "bengal"]
    write_json_dataset(data_root, "oxford_pets", "images", "OxfordPets", classes,
                       rel=lambda c, s, i: f"{c}_{s}_{i}.jpg")
    return data_root


@pytest.fixture
def caltech_root(data_root):
    write_json_dataset(data_root, "caltech-101", "101_ObjectCategories", "Caltech101",
                       ["accordion", "airplane", "face", "leopard"])
    return data_root


@pytest.fixture
def dtd_root(data_root):
    write_json_dataset(data_root, "dtd", "images", "DescribableTextures", ["banded", "blotchy", "braided"])
    return data_root


IMAGENET = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
            "n01491361": "tiger shark", "n01494475": "hammerhead shark"}


def _classnames_txt(path: Path, names: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in names.items()))


@pytest.fixture
def imagenet_root(data_root):
    d = data_root / "imagenet"
    _classnames_txt(d / "classnames.txt", IMAGENET)
    for wnid in IMAGENET:
        for i in range(3):
            save_image(d / "images" / "train" / wnid / f"{wnid}_{i}.JPEG")
        save_image(d / "images" / "val" / wnid / f"val_{wnid}.JPEG")
    return data_root


@pytest.fixture
def imagenet_a_root(data_root):
    """A 2-class subset (the real one has 200 of the 1000), with README.txt and classnames.txt."""
    d = data_root / "imagenet-adversarial"
    _classnames_txt(d / "classnames.txt", IMAGENET)
    for wnid in ("n01494475", "n01443537"):
        for i in range(2):
            save_image(d / "imagenet-a" / wnid / f"{i}.jpg")
    (d / "imagenet-a" / "README.txt").write_text("not a class\n")
    return data_root


@pytest.fixture
def imagenetv2_root(data_root):
    d = data_root / "imagenetv2"
    _classnames_txt(d / "classnames.txt", IMAGENET)
    for label in range(len(IMAGENET)):
        save_image(d / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg")
    return data_root


@pytest.fixture
def aircraft_root(data_root):
    d = data_root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F/A-18"]
    d.mkdir()
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split, k in (("train", 2), ("val", 1), ("test", 2)):
        lines = []
        for v in variants:
            for _ in range(k):
                n += 1
                save_image(d / "images" / f"{n:07d}.jpg")
                lines.append(f"{n:07d} {v}")
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return data_root


@pytest.fixture
def labelled_tree(tmp_path):
    """A custom labelled folder: one sub-folder per class, a nested image, a stray text file."""
    root = tmp_path / "mydomain"
    for c in ("zebra", "aardvark", "hot_dog"):
        for i in range(2):
            save_image(root / c / f"{i}.png")
    save_image(root / "zebra" / "nested" / "deep.jpg")
    (root / "notes.txt").write_text("ignored\n")
    (root / "zebra" / "readme.txt").write_text("ignored\n")
    return root
