"""Custom domains: plain image folders, class-name files and split files of the user's own data.

Every image is checked once when the folder is read (dataset.scan_images), so a corrupt file
is reported up front instead of crashing a data-loader worker mid-training.
"""

from __future__ import annotations

import os

from promptkd.data.coop import absolute_path, check_unique, class_folders, read_split_json
from promptkd.data.dataset import DatasetSplits, Item, clean_classname, scan_images
from promptkd.errors import PromptKDError

SPLIT_NAMES = ("train", "val", "test")
# Split folder names of common exports (Roboflow, Kaggle, timm's ImageFolder layouts) -> our split.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def read_classnames(path: str | os.PathLike) -> list[str]:
    """One class name per line; blank lines and lines starting with '#' are ignored."""
    path = absolute_path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: class-names file not found")
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    names = [clean_classname(line) for line in lines if line and not line.startswith("#")]
    if not names:
        raise PromptKDError(f"{path}: no class names (one per line expected)")
    return check_unique(names, path)


def labelled_folder(
    path: str | os.PathLike, strict: bool = False, classnames: list[str] | None = None
) -> tuple[list[Item], list[str]]:
    """One sub-folder per class, classes in alphabetical folder order; images read recursively.

    With `classnames` (folder names, e.g. those of the train split) labels index into that list
    and a folder not in it is an error.
    """
    path = absolute_path(path)
    folders = class_folders(path)
    if not folders:
        raise PromptKDError(f"{path}: no class sub-folders (expected one folder of images per class)")
    order = folders if classnames is None else classnames
    label_of = {c: i for i, c in enumerate(order)}
    items = []
    for c in folders:
        if c not in label_of:
            raise PromptKDError(f"{path / c}: class folder not present in the train split")
        found = scan_images(path / c, strict=strict).paths
        if not found:
            raise PromptKDError(f"{path / c}: class folder has no images")
        items.extend(Item(p, label_of[c]) for p in found)
    return items, order


def folder_dataset(path: str | os.PathLike, strict: bool = False) -> DatasetSplits:
    """A labelled folder as a dataset.

    If its sub-folders are split folders (train/ plus val/ or valid/ or validation/, test/), each is
    a labelled split with the classes of train/. Otherwise every image is in both train and test and
    val is empty: a single folder has no held-out data, so its test accuracy is transductive.
    """
    path = absolute_path(path)
    subs = class_folders(path)
    splits = {s: SPLIT_FOLDERS[s.lower()] for s in subs if s.lower() in SPLIT_FOLDERS}
    if "train" in splits.values() and len(splits) == len(subs):
        by_split: dict[str, str] = {}
        for folder, split in splits.items():
            if split in by_split:
                raise PromptKDError(f"{path}: both {by_split[split]}/ and {folder}/ look like the {split} split")
            by_split[split] = folder
        train, folders = labelled_folder(path / by_split["train"], strict)
        val = labelled_folder(path / by_split["val"], strict, folders)[0] if "val" in by_split else []
        test = labelled_folder(path / by_split["test"], strict, folders)[0] if "test" in by_split else []
    elif len(splits) >= 2:
        others = sorted(set(subs) - set(splits))
        raise PromptKDError(f"{path}: mixes split folders ({', '.join(sorted(splits))}) with other folders "
                            f"({', '.join(others[:3])}); give one folder per class, or train/ val/ test/ "
                            "each holding one folder per class")
    else:
        train, folders = labelled_folder(path, strict)
        val, test = [], list(train)
    classnames = check_unique([clean_classname(f) for f in folders], path)
    return DatasetSplits(f"folder:{path}", classnames, train, val, test)


def unlabelled_folder(path: str | os.PathLike, strict: bool = False) -> list[Item]:
    """Every readable image under `path` (recursive, sorted), label -1."""
    return [Item(p, -1) for p in scan_images(absolute_path(path), strict=strict).paths]


def images_dataset(path: str | os.PathLike, strict: bool = False) -> DatasetSplits:
    """Unlabelled domain images for distillation: all in train, no classes (give a class-names file)."""
    items = unlabelled_folder(path, strict)
    if not items:
        raise PromptKDError(f"{absolute_path(path)}: no readable images found")
    return DatasetSplits(f"images:{absolute_path(path)}", [], items, [], [])


def split_file_dataset(
    split_path: str | os.PathLike, image_root: str | os.PathLike, classnames_file: str | os.PathLike | None = None
) -> DatasetSplits:
    """A split_zhou-format JSON for your own images, paths relative to `image_root`.

    With `classnames_file` the names come from it (one per line) and entries may omit them.
    """
    names = read_classnames(classnames_file) if classnames_file is not None else None
    train, val, test, classnames = read_split_json(split_path, image_root, names)
    return DatasetSplits(f"split:{absolute_path(split_path)}", classnames, train, val, test)
