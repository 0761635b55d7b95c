"""What a dataset is (items, splits) and the torch Dataset that reads images for training.

Images are decoded with PIL and converted to RGB the way a user expects (16-bit scaled, alpha
composited on white), and training augmentation draws from a generator seeded by
(seed, epoch, index) so that any sample of any epoch can be reproduced or replayed.

An image that cannot be read while training (deleted, truncated or replaced since the dataset was
listed) does not end the run: under the default `on_bad_image="substitute"` the next readable item
(index + 1, + 2, ... wrapping around) takes its place, deterministically, so exact resume still
holds; each unreadable file is logged once and counted (`unreadable_count()`, shown in the epoch
metrics). `on_bad_image="error"` makes it fatal. Evaluation datasets default to "error": an
accuracy must be over the images it names.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from promptkd.errors import PromptKDError, raise_if_interrupted

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


class Item(NamedTuple):
    """One image: absolute path and integer label (-1 for unlabelled images)."""

    path: str
    label: int


@dataclass
class DatasetSplits:
    """A dataset as every builder returns it; `classnames[label]` names each label."""

    name: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    class_ids: list[str] | None = None  # stable ids (ImageNet wnids) to match classes across datasets


def clean_classname(name: str) -> str:
    """The official prompt learner replaces underscores by spaces before tokenising."""
    return name.replace("_", " ")


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Absolute paths of image files under `folder`, sorted, hidden files and folders skipped."""
    folder = os.path.abspath(folder)
    if not recursive:
        with os.scandir(folder) as it:
            return sorted(e.path for e in it if e.is_file() and is_image_file(e.name))
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(out)


def check_image(path: str, max_pixels: int | None = None) -> str | None:
    """Cheaply check that `path` decodes; return why not, or None when it is fine.

    open+verify catches non-images and broken headers/PNG checksums; JPEGs are additionally
    decoded at 1/8 scale (draft mode) because verify() does not notice a truncated JPEG.
    """
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if limit and w * h > limit:
                    return f"{w}x{h} pixels is over the limit of {limit} (possible decompression bomb)"
                fmt = im.format
                im.verify()
            if fmt == "JPEG":
                with Image.open(path) as im:
                    im.draft("RGB", (1, 1))
                    im.load()
    except Image.DecompressionBombError as e:
        return f"possible decompression bomb ({e})"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad files
        raise_if_interrupted()  # a Ctrl-C that cut a PIL plugin's import short is no bad file
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


class ScanResult(NamedTuple):
    paths: list[str]
    skipped: list[tuple[str, str]]  # (path, reason)


def scan_images(folder: str | os.PathLike, strict: bool = False, max_pixels: int | None = None) -> ScanResult:
    """Recursively list and check the images of an unlabelled folder.

    Bad files are skipped and counted (logged), or raise PromptKDError when `strict`, so that a
    corrupt file is found now rather than hours into training.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptKDError(f"{folder}: image folder not found")
    paths, skipped = [], []
    for p in list_images(folder):
        reason = check_image(p, max_pixels)
        if reason is None:
            paths.append(p)
        elif strict:
            raise PromptKDError(f"{p}: {reason}")
        else:
            skipped.append((p, reason))
    if skipped:
        log.warning("%s: skipped %d unreadable file(s), e.g. %s: %s", folder, len(skipped), *skipped[0])
    return ScanResult(paths, skipped)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without PIL's clipping of 16-bit values or black alpha."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range onto 8-bit
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Read an image as RGB; a bad file is a PromptKDError naming it."""
    return ImageSource(path).image()


def _unreadable(path: str, e: Exception) -> PromptKDError:
    return PromptKDError(f"{path}: cannot read image ({type(e).__name__}: {e})")


class ImageSource:
    """An image file opened for rendering: the size comes from its header, the pixels are decoded on
    demand, once per reduction, as RGB (load_rgb's conversions, no EXIF rotation).

    A JPEG can be decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL's draft mode),
    which costs a fraction of a full decode; a crop rendered at a much smaller output size loses
    nothing by it. Other formats ignore the reduction. `pixels()` gives a uint8 HWC tensor: full-size
    YCbCr and greyscale JPEGs are decoded by torchvision.io.decode_jpeg straight into it (the same
    libjpeg-turbo decode as PIL's, pixel for pixel, without PIL's copies); everything else, and any
    file decode_jpeg refuses, goes through PIL. A bad file is a PromptKDError naming it, when opened
    or when decoded.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._images: dict[int, tuple[Image.Image, float]] = {}
        self._pixels: dict[int, tuple[torch.Tensor, float]] = {}
        self._im = self._data = None
        header = _plain_jpeg(self.path)  # a YCbCr or greyscale JPEG needs no PIL at all
        if header is not None:
            self._data, self.width, self.height = header
            self.is_jpeg = True
        else:
            self._im = self._open()
            self.width, self.height = self._im.size
            self.is_jpeg = self._im.format == "JPEG"

    def _open(self) -> Image.Image:
        try:  # bytes already read for the header are not read again
            return Image.open(io.BytesIO(self._data) if self._data is not None else self.path)
        except Exception as e:  # PIL raises many types on bad files
            raise_if_interrupted()
            raise _unreadable(self.path, e) from None

    def image(self) -> Image.Image:
        return self.decoded()[0]

    def decoded(self, reduce: int = 1) -> tuple[Image.Image, float]:
        """(RGB PIL image, factor it is smaller than the file by): `reduce` for a JPEG, else 1."""
        reduce = reduce if self.is_jpeg else 1
        if reduce not in self._images:
            im, self._im = (self._im or self._open()), None
            try:
                factor = 1.0
                if reduce > 1:  # PIL picks the largest of 8, 4, 2 that keeps the size asked for
                    drafted = im.draft(im.mode, (max(self.width // reduce, 1), max(self.height // reduce, 1)))
                    factor = self.width / drafted[1][2] if drafted else 1.0
                im.load()  # closes a single-frame file; an RGB one needs no copy then
                rgb = im if im.mode == "RGB" and getattr(im, "fp", None) is None else to_rgb(im)
                if rgb is not im:
                    im.close()
                self._images[reduce] = (rgb, factor)
            except Exception as e:
                im.close()
                raise_if_interrupted()
                raise _unreadable(self.path, e) from None
        return self._images[reduce]

    def pixels(self, reduce: int = 1) -> tuple[torch.Tensor, float]:
        """(uint8 RGB tensor of shape (H, W, 3), factor it is smaller than the file by)."""
        reduce = reduce if self.is_jpeg else 1
        if reduce not in self._pixels:
            x = _decode_jpeg(self._data) if reduce == 1 and self._data is not None else None
            if x is not None:
                self._pixels[reduce] = (x, 1.0)
            else:
                img, factor = self.decoded(reduce)
                self._pixels[reduce] = (hwc_tensor(img), factor)
        return self._pixels[reduce]


def hwc_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image's pixels as an (H, W, C) uint8 tensor without a copy (read-only: the renderer never
    writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img))


def _decode_jpeg(data: bytearray) -> torch.Tensor | None:
    """libjpeg-turbo through torchvision.io into an (H, W, 3) tensor; None where it cannot (PIL then decides)."""
    try:
        import torchvision.io as tio

        with warnings.catch_warnings():  # its deprecation notice: PIL takes over once it is gone
            warnings.simplefilter("ignore")
            return tio.decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=tio.ImageReadMode.RGB).permute(1, 2, 0)
    except Exception:
        raise_if_interrupted()  # an interrupted torchvision import is no undecodable JPEG
        return None


_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended and progressive Huffman frames


def _plain_jpeg(path: str) -> tuple[bytearray, int, int] | None:
    """(file bytes, width, height) of an 8-bit JPEG with 1 or 3 components, read from its frame
    header; None for anything else (other formats, CMYK, arithmetic coding, odd or broken headers:
    PIL reads those, and says what is wrong)."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return None
            f.seek(0)
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
    except OSError:
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            limit = Image.MAX_IMAGE_PIXELS
            ok = data[i + 4] == 8 and data[i + 9] in (1, 3) and width and height
            return (data, width, height) if ok and not (limit and width * height > 2 * limit) else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker in (0xD9, 0xDA):
            return None  # another frame type, or no frame header before the scan
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


BAD_IMAGE_POLICIES = ("substitute", "error")


def read_item(items, index: int, on_bad_image: str = "substitute",
              unreadable: torch.Tensor | None = None, load: Callable[[int], Any] | None = None) -> tuple[Any, int, int]:
    """(RGB image, label, item index) of `items[index]`, or of the next readable item.

    With on_bad_image="error" an unreadable image raises PromptKDError naming the file. With
    "substitute" it is marked in `unreadable` (a bool tensor, one flag per item, logged once)
    and items index+1, index+2, ... (wrapping) are tried in turn. `load(j)`, when given, reads
    item j instead of load_rgb (e.g. renders a view from the file); it raises PromptKDError for
    an unreadable file.
    """
    n = len(items)
    for k in range(n):
        j = (index + k) % n
        path, label = items[j]
        try:
            return (load(j) if load is not None else load_rgb(path)), label, j
        except PromptKDError as e:
            if on_bad_image == "error":
                raise
            if unreadable is not None and not bool(unreadable[j]):
                unreadable[j] = True
                log.warning("%s; using the next readable image in its place", e)
    raise PromptKDError(f"none of the {n} images of the dataset can be read")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index): independent of workers and order."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ImageDataset(torch.utils.data.Dataset):
    """Items -> (image tensor, label, index).

    In train mode `transform.draw(source, generator)` renders a view from the file and returns
    (tensor, view) (see TrainTransform); the generator is seeded from (seed, epoch, index) so a resumed run sees the same views.
    Call set_epoch() each epoch; workers must be re-created per epoch (persistent_workers=False)
    for them to see it.

    An unreadable image is replaced by the next readable item (its image and label; the returned
    index is that item's) or is an error, per `on_bad_image` (default: substitute when training,
    error when evaluating). The unreadable flags live in shared memory, so files met by
    DataLoader workers are counted too.
    """

    def __init__(self, items, transform, seed: int = 0, train: bool = True, on_bad_image: str | None = None):
        self.items = list(items)
        self.transform = transform
        self.seed = seed
        self.train = train
        self.epoch = 0
        self.set_on_bad_image(on_bad_image or ("substitute" if train else "error"))
        self.unreadable = torch.zeros(len(self.items), dtype=torch.bool).share_memory_()

    def set_on_bad_image(self, policy: str) -> None:
        if policy not in BAD_IMAGE_POLICIES:
            raise PromptKDError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {policy!r}")
        self.on_bad_image = policy

    def unreadable_count(self) -> int:
        """How many distinct items were found unreadable so far (in any worker)."""
        return int(self.unreadable.sum())

    def read(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, label, item index) for position `index`, after the bad-image policy."""
        return read_item(self.items, index, self.on_bad_image, self.unreadable)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def generator_for(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int):
        if self.train:  # renders from the file (see transforms.TrainTransform.draw)
            # A substitute is augmented with this position's generator (no duplicate view), a fresh one per try.
            (tensor, _view), label, used = read_item(
                self.items, index, self.on_bad_image, self.unreadable,
                load=lambda j: self.transform.draw(ImageSource(self.items[j][0]), self.generator_for(index)))
            return tensor, label, used
        img, label, used = self.read(index)
        return self.transform(img), label, used
