"""Builders for the CoOp/PromptKD benchmarks, reading the exact on-disk layout of CoOp's DATASETS.md.

Each builder returns all splits of all classes (DatasetSplits); few-shot sampling and base/novel
subsampling are separate (sampling.py, protocols.py). Unlike the official code, nothing is ever
written into the dataset folder (no preprocessed.pkl, no split_fewshot/), a missing split file is
an error (the official code would draw a new random split), and every listed image is checked to
exist before anything trains.
"""

from __future__ import annotations

import os
from pathlib import Path

from promptkd.artifacts import read_json
from promptkd.data.dataset import DatasetSplits, Item, clean_classname, list_images
from promptkd.errors import PromptKDError

# cfg NAME -> (folder under the data root, image folder inside it that split paths are relative to)
JSON_DATASETS = {
    "Caltech101": ("caltech-101", "101_ObjectCategories"),
    "OxfordPets": ("oxford_pets", "images"),
    "StanfordCars": ("stanford_cars", ""),
    "OxfordFlowers": ("oxford_flowers", "jpg"),
    "Food101": ("food-101", "images"),
    "SUN397": ("sun397", "SUN397"),
    "DescribableTextures": ("dtd", "images"),
    "EuroSAT": ("eurosat", "2750"),
    "UCF101": ("ucf101", "UCF-101-midframes"),
}

# cfg NAME -> (folder under the data root, image folder inside it)
IMAGENET_VARIANTS = {
    "ImageNetSketch": ("imagenet-sketch", "images"),
    "ImageNetA": ("imagenet-adversarial", "imagenet-a"),
    "ImageNetR": ("imagenet-rendition", "imagenet-r"),
    "ImageNetV2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
}


def absolute_path(path: str | os.PathLike) -> Path:
    """Absolute and normalised, but symlinks kept (dataset folders are often links)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def dataset_dir(root: str | os.PathLike, folder: str, marker: str) -> Path:
    """`root/folder`, or `root` itself when the user pointed at the dataset folder directly."""
    root = absolute_path(root)
    for d in (root / folder, root):
        if (d / marker).exists():
            return d
    raise PromptKDError(f"{root / folder / marker}: not found (expected the CoOp layout <root>/{folder}/{marker})")


def safe_join(base: Path, rel, source) -> str:
    """Join a path read from a file under `base`, refusing absolute paths and `..` escapes."""
    if not isinstance(rel, str) or not rel:
        raise PromptKDError(f"{source}: image path must be a non-empty string, got {rel!r}")
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or norm == ".." or norm.startswith(".." + os.sep):
        raise PromptKDError(f"{source}: image path {rel!r} points outside the image folder {base}")
    return os.path.join(base, norm)


def check_files_exist(paths, source) -> None:
    """One error for all missing images, before any training starts (Dassl asserted one at a time)."""
    paths = list(dict.fromkeys(paths))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3])
        raise PromptKDError(f"{source}: {len(missing)} of {len(paths)} listed images are missing, e.g. {shown}")


def classnames_from_items(named: list[tuple[int, str]], source) -> list[str]:
    """Label-ordered class names from (label, name) pairs; labels must be exactly 0..n-1."""
    names: dict[int, str] = {}
    for label, name in named:
        if names.setdefault(label, name) != name:
            raise PromptKDError(f"{source}: label {label} is named both {names[label]!r} and {name!r}")
    if not names:
        raise PromptKDError(f"{source}: no images listed")
    n = max(names) + 1
    absent = [i for i in range(n) if i not in names]
    if absent:
        raise PromptKDError(f"{source}: labels must be 0..{n - 1} but no image has label(s) {absent[:10]}")
    return check_unique([clean_classname(names[i]) for i in range(n)], source)


def check_unique(classnames: list[str], source) -> list[str]:
    """Two classes with the same (case-insensitive) name would get identical text features."""
    seen: dict[str, str] = {}
    for c in classnames:
        if c.casefold() in seen:
            raise PromptKDError(f"{source}: duplicate class name {c!r}")
        seen[c.casefold()] = c
    return classnames


def read_split_json(split_path, image_root, classnames: list[str] | None = None):
    """Read a split_zhou JSON ({"train"|"val"|"test": [[rel_path, label, classname], ...]}).

    Returns (train, val, test, classnames). With `classnames` given (custom split files), entries
    may be [rel_path, label] and labels index into that list.
    """
    split_path, image_root = absolute_path(split_path), absolute_path(image_root)
    data = read_json(split_path)
    if not isinstance(data, dict) or not set(data) <= {"train", "val", "test"} or not data:
        raise PromptKDError(f"{split_path}: expected a JSON object with keys 'train', 'val', 'test'")
    splits, named = {}, []
    for key in ("train", "val", "test"):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise PromptKDError(f"{split_path}: '{key}' must be a list of [path, label, classname]")
        items = []
        for i, e in enumerate(entries):
            where = f"{split_path} ['{key}'][{i}]"
            ok = isinstance(e, list) and len(e) in ((2, 3) if classnames is not None else (3,))
            if not ok or type(e[1]) is not int or (len(e) == 3 and not isinstance(e[2], str)):
                raise PromptKDError(f"{where}: expected [path, int label, classname], got {e!r}")
            label = e[1]
            if label < 0 or (classnames is not None and label >= len(classnames)):
                n = len(classnames) if classnames is not None else "n"
                raise PromptKDError(f"{where}: label {label} out of range 0..{n}-1")
            items.append(Item(safe_join(image_root, e[0], where), label))
            if classnames is None:
                named.append((label, e[2]))
        splits[key] = items
    if classnames is None:
        classnames = classnames_from_items(named, split_path)
    else:
        classnames = check_unique([clean_classname(c) for c in classnames], split_path)
    check_files_exist((it.path for s in splits.values() for it in s), f"{split_path} (images under {image_root})")
    return splits["train"], splits["val"], splits["test"], classnames


def build_json_dataset(name: str, root) -> DatasetSplits:
    """One of the split_zhou_<NAME>.json benchmarks (class names come processed from the json)."""
    folder, image_folder = JSON_DATASETS[name]
    split_file = f"split_zhou_{name}.json"
    d = dataset_dir(root, folder, split_file)
    image_root = d / image_folder
    if not image_root.is_dir():
        raise PromptKDError(f"{image_root}: image folder not found")
    train, val, test, classnames = read_split_json(d / split_file, image_root)
    return DatasetSplits(name, classnames, train, val, test)


def build_fgvc_aircraft(root) -> DatasetSplits:
    """FGVC-Aircraft: labels are line numbers of variants.txt; splits are `<image id> <variant>` lines."""
    d = dataset_dir(root, "fgvc_aircraft", "variants.txt")
    variants = [line.strip() for line in (d / "variants.txt").read_text().splitlines() if line.strip()]
    check_unique(variants, d / "variants.txt")
    label_of = {v: i for i, v in enumerate(variants)}
    splits = []
    for split in ("train", "val", "test"):
        path = d / f"images_variant_{split}.txt"
        if not path.is_file():
            raise PromptKDError(f"{path}: split file not found")
        items = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise PromptKDError(f"{path}:{n}: variant {variant!r} is not in variants.txt")
            items.append(Item(safe_join(d / "images", image_id + ".jpg", f"{path}:{n}"), label_of[variant]))
        splits.append(items)
    check_files_exist((it.path for s in splits for it in s), f"{d} (images_variant_*.txt)")
    return DatasetSplits("FGVCAircraft", [clean_classname(v) for v in variants], *splits)


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """ImageNet's classnames.txt: `<wnid> <class name>` per line, in label order."""
    if not path.is_file():
        raise PromptKDError(f"{path}: classnames file not found (format: '<wnid> <class name>' per line)")
    names: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip() or wnid in names:
            raise PromptKDError(f"{path}:{n}: expected a new '<wnid> <class name>', got {line!r}")
        names[wnid] = name.strip()
    return names


def class_folders(folder: Path) -> list[str]:
    """Sorted non-hidden sub-folders (files such as ImageNet-A's README.txt are ignored)."""
    if not folder.is_dir():
        raise PromptKDError(f"{folder}: folder not found")
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _folder_items(folder: Path, label: int) -> list[Item]:
    if not folder.is_dir():
        raise PromptKDError(f"{folder}: class folder not found")
    paths = list_images(folder, recursive=False)
    if not paths:
        raise PromptKDError(f"{folder}: class folder has no images")
    return [Item(p, label) for p in paths]


def _wnid_items(image_dir: Path, wnids: list[str], names: dict[str, str], source) -> list[Item]:
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise PromptKDError(f"{image_dir}: folder(s) {unknown[:5]} not listed in {source}")
    return [it for label, w in enumerate(wnids) for it in _folder_items(image_dir / w, label)]


def build_imagenet(root) -> DatasetSplits:
    """ImageNet: labels = sorted wnid folders of images/train; images/val is the test split.

    Files are listed sorted (the official code used unsorted os.listdir order, which depends on
    the filesystem), so few-shot draws are reproducible across machines. There is no val split.
    """
    d = dataset_dir(root, "imagenet", "classnames.txt")
    names = read_wnid_classnames(d / "classnames.txt")
    train_dir, val_dir = d / "images" / "train", d / "images" / "val"
    wnids = class_folders(train_dir)
    if not wnids:
        raise PromptKDError(f"{train_dir}: no class folders")
    train = _wnid_items(train_dir, wnids, names, d / "classnames.txt")
    label_of = {w: i for i, w in enumerate(wnids)}
    test = []
    for w in class_folders(val_dir):
        if w not in label_of:
            raise PromptKDError(f"{val_dir / w}: class folder has no counterpart in {train_dir}")
        test.extend(_folder_items(val_dir / w, label_of[w]))
    return DatasetSplits("ImageNet", [clean_classname(names[w]) for w in wnids], train, [], test, wnids)


def _variant_names(d: Path, root) -> tuple[dict[str, str], Path]:
    """CoOp copies classnames.txt into each variant folder; fall back to <root>/imagenet/."""
    for path in (d / "classnames.txt", absolute_path(root) / "imagenet" / "classnames.txt"):
        if path.is_file():
            return read_wnid_classnames(path), path
    return read_wnid_classnames(d / "classnames.txt"), d / "classnames.txt"  # raises, naming the file


def build_imagenet_variant(name: str, root) -> DatasetSplits:
    """ImageNet-Sketch/-A/-R (wnid folders; A and R hold a 200-class subset) and ImageNetV2.

    Test-only: every image is in `test`. class_ids are the wnids, so that protocols can map the
    variant's classes onto ImageNet's (see protocols.domain_generalisation).
    """
    folder, image_folder = IMAGENET_VARIANTS[name]
    d = dataset_dir(root, folder, image_folder)
    image_dir = d / image_folder
    names, source = _variant_names(d, root)
    if name == "ImageNetV2":  # folders 0..999 index the lines of classnames.txt
        wnids = list(names)
        test = [it for label in range(len(wnids)) for it in _folder_items(image_dir / str(label), label)]
    else:
        wnids = class_folders(image_dir)
        if not wnids:
            raise PromptKDError(f"{image_dir}: no class folders")
        test = _wnid_items(image_dir, wnids, names, source)
    return DatasetSplits(name, [clean_classname(names[w]) for w in wnids], [], [], test, wnids)
