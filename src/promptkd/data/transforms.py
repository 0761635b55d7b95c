"""Image transforms matching the official ones (Dassl: RandomResizedCrop + flip; resize + center crop),
but with every random draw taken from an explicit torch.Generator.

That makes an augmented view a value (View) that can be recorded, replayed with apply_view, and
reproduced after a resume; with the generator seeded like torch's global RNG the views equal
torchvision's RandomResizedCrop + RandomHorizontalFlip draw for draw.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from promptkd.errors import PromptKDError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


class View(NamedTuple):
    """A crop box in the source image (pixels) and whether the crop is mirrored."""

    top: int
    left: int
    h: int
    w: int
    flip: bool


def sample_view(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> View:
    """torchvision's RandomResizedCrop.get_params (10 tries, log-uniform aspect ratio, central-crop
    fallback), then a p=0.5 flip, all drawn from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    box = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            box = (top, left, h, w)
            break
    if box is None:  # central crop clamped to the allowed aspect ratios
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return View(*box, flip)


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        raise PromptKDError(f"unknown interpolation {name!r} (use bicubic, bilinear or nearest)") from None


class TrainTransform:
    """Random resized crop to size x size, random flip, to tensor, normalise (the official train
    pipeline); `__call__(img, generator) -> (tensor, view)`."""

    def __init__(self, size=CLIP_SIZE, mean=CLIP_MEAN, std=CLIP_STD, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic"):
        self.size, self.mean, self.std = int(size), list(mean), list(std)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = _interpolation(interpolation)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> tuple[torch.Tensor, View]:
        view = sample_view(img.width, img.height, generator, self.scale, self.ratio)
        return self.apply_view(img, view), view

    def apply_view(self, img: Image.Image, view: View) -> torch.Tensor:
        """Render a recorded view: the same pixels as when it was drawn."""
        out = F.resized_crop(img, view.top, view.left, view.h, view.w, [self.size, self.size],
                             interpolation=self.interpolation)
        if view.flip:
            out = F.hflip(out)
        return F.normalize(F.to_tensor(out), self.mean, self.std)


class TestTransform:
    """Resize the shorter side to size, center crop (the official test pipeline; open_clip's
    'shortest' mode); resize_mode='squash' resizes straight to size x size."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, size=CLIP_SIZE, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic",
                 resize_mode: str = "shortest"):
        if resize_mode not in ("shortest", "squash"):
            raise PromptKDError(f"resize_mode {resize_mode!r} is not supported (use shortest or squash)")
        self.size, self.mean, self.std = int(size), list(mean), list(std)
        self.interpolation = _interpolation(interpolation)
        self.resize_mode = resize_mode

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.resize_mode == "squash":
            img = F.resize(img, [self.size, self.size], interpolation=self.interpolation)
        else:
            img = F.center_crop(F.resize(img, self.size, interpolation=self.interpolation), self.size)
        return F.normalize(F.to_tensor(img), self.mean, self.std)


def transforms_for(preprocess_cfg: dict | None = None, scale=None) -> tuple[TrainTransform, TestTransform]:
    """Train and test transforms for an open_clip model's `visual.preprocess_cfg` (CLIP defaults for
    missing keys), so a student with other normalisation or resolution gets its own inputs.

    The random-resized-crop scale is `scale`, else the config's `crop_scale` (the toy models set
    one: at 48 px an 8% crop often misses the object), else the official (0.08, 1).
    """
    cfg = dict(preprocess_cfg or {})
    scale = tuple(scale or cfg.get("crop_scale") or (0.08, 1.0))
    size = cfg.get("size", CLIP_SIZE)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise PromptKDError(f"non-square input size {tuple(size)} is not supported")
        size = size[0]
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    interpolation = cfg.get("interpolation", "bicubic")
    train = TrainTransform(size, mean, std, scale=scale, interpolation=interpolation)
    test = TestTransform(size, mean, std, interpolation, cfg.get("resize_mode", "shortest"))
    return train, test
