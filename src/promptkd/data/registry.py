"""Build any dataset by name: the CoOp benchmarks by their cfg NAME (or a snake-case alias), and the
user's own data through `folder:`, `images:` and `split:` prefixes. One entry point, one signature.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

import promptkd.data.coop as coop
import promptkd.data.folders as folders
from promptkd.data.dataset import DatasetSplits
from promptkd.errors import PromptKDError

BUILDERS: dict[str, Callable[[Path], DatasetSplits]] = {
    **{name: functools.partial(coop.build_json_dataset, name) for name in coop.JSON_DATASETS},
    "ImageNet": coop.build_imagenet,
    "FGVCAircraft": coop.build_fgvc_aircraft,
    **{name: functools.partial(coop.build_imagenet_variant, name) for name in coop.IMAGENET_VARIANTS},
}

ALIASES = {
    "flowers102": "OxfordFlowers",
    "flowers": "OxfordFlowers",
    "dtd": "DescribableTextures",
    "pets": "OxfordPets",
    "cars": "StanfordCars",
    "aircraft": "FGVCAircraft",
    "caltech": "Caltech101",
    "food": "Food101",
    "sun": "SUN397",
    "ucf": "UCF101",
    "imagenetadversarial": "ImageNetA",
    "imagenetrendition": "ImageNetR",
}

CUSTOM_PREFIXES = ("folder:", "images:", "split:")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_BY_KEY = {_key(n): n for n in BUILDERS} | {_key(a): n for a, n in ALIASES.items()}


def dataset_names() -> list[str]:
    """The benchmark names (official cfg NAMEs) build_dataset knows."""
    return list(BUILDERS)


def canonical_name(name: str) -> str:
    """'oxford_pets' / 'OxfordPets' / 'dtd' -> the official cfg NAME; unknown -> error listing names."""
    found = _BY_KEY.get(_key(name))
    if found is None:
        known = ", ".join(dataset_names())
        raise PromptKDError(
            f"unknown dataset {name!r}; known: {known}, or folder:PATH, images:PATH, split:FILE.json"
        )
    return found


def _under(root, path: str) -> Path:
    path = os.path.expanduser(path)
    return coop.absolute_path(path if root is None or os.path.isabs(path) else os.path.join(root, path))


def build_dataset(name: str, root: str | os.PathLike | None = None, *, strict: bool = False) -> DatasetSplits:
    """Build a dataset.

    - benchmark name: `root` is the data root holding the CoOp folders (or the dataset folder).
    - `folder:PATH`: labelled folder, one sub-folder per class (optionally train/ val/ test/).
    - `images:PATH`: unlabelled images, read recursively.
    - `split:FILE.json`: a split_zhou-format file; image paths are relative to `root`
      (default: the file's folder).
    Relative PATHs are taken under `root`. `strict` makes an unreadable image fatal in folders.
    """
    prefix, _, rest = name.partition(":")
    if name.startswith(CUSTOM_PREFIXES):
        if not rest:
            raise PromptKDError(f"dataset {name!r}: a path is needed after '{prefix}:'")
        if prefix == "folder":
            return folders.folder_dataset(_under(root, rest), strict=strict)
        if prefix == "images":
            return folders.images_dataset(_under(root, rest), strict=strict)
        split_path = _under(root, rest)
        return folders.split_file_dataset(split_path, root if root is not None else split_path.parent)
    builder = BUILDERS[canonical_name(name)]
    if root is None:
        raise PromptKDError(f"dataset {name!r}: a data root is needed (the folder holding the CoOp datasets)")
    return builder(root)
