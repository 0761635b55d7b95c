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
import torch.nn.functional as nnf
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from promptkd.data.dataset import ImageSource, hwc_tensor
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


RENDERERS = ("pil", "uint8")


class TrainTransform:
    """Random resized crop to size x size, random flip, to tensor, normalise (the official train
    pipeline, in PIL); `__call__(img, generator) -> (tensor, view)`.

    `draw(source, generator)` / `render(source, view)` do the same from an ImageSource (a file),
    and `normalize(batch)` finishes a rendered batch on its device (nothing to do here: this
    renderer normalises on the CPU). Uint8TrainTransform is the fast renderer with the same draws.
    """

    renderer = "pil"

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

    def draw(self, source: ImageSource, generator: torch.Generator) -> tuple[torch.Tensor, View]:
        """Draw a view of an image file (from its header size) and render it."""
        view = sample_view(source.width, source.height, generator, self.scale, self.ratio)
        return self.render(source, view), view

    def render(self, source: ImageSource, view: View) -> torch.Tensor:
        return self.apply_view(source.image(), view)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def normalizer(self, device: torch.device):
        """normalize() as a function with its constants already on `device` (for a compiled step)."""
        return self.normalize


class Uint8TrainTransform(TrainTransform):
    """The same views rendered fast: uint8 crop and antialiased resize in torch (PIL's bicubic
    kernel, a = -0.5), uint8 out; `normalize(batch)` converts and normalises on the batch's device.

    Per image this skips PIL's float-free but slow resampler, to_tensor and normalise on the CPU,
    and ships 4x fewer bytes from the loader workers. A JPEG whose crop is at least 2x (4x, 8x)
    the output size on both sides is decoded at 1/2 (1/4, 1/8) scale (ImageSource), so the
    final resize still only shrinks. Pixels differ from the PIL renderer by rounding (see
    docs/distill.md); the renderer is a pure function of (file, view), so a teacher cache and the
    student replaying it see the same pixels.
    """

    renderer = "uint8"
    _MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.interpolation.value not in self._MODES:
            raise PromptKDError(f"the uint8 renderer supports {', '.join(self._MODES)}, "
                                f"not {self.interpolation.value!r}")
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self):  # loader workers get the settings, never device tensors
        return {**self.__dict__, "_stats": {}}

    def reduction(self, source: ImageSource, view: View) -> int:
        """The largest JPEG decode reduction that keeps the crop at least the output size."""
        if not source.is_jpeg:
            return 1
        return next((r for r in (8, 4, 2) if min(view.h, view.w) >= r * self.size), 1)

    def render(self, source: ImageSource, view: View) -> torch.Tensor:
        pixels, factor = source.pixels(self.reduction(source, view))
        if factor != 1:  # the crop box in the reduced image, rounded to whole pixels (at most half one off)
            top, left = round(view.top / factor), round(view.left / factor)
            bottom = min(max(round((view.top + view.h) / factor), top + 1), pixels.shape[0])
            right = min(max(round((view.left + view.w) / factor), left + 1), pixels.shape[1])
            view = View(top, left, bottom - top, right - left, view.flip)
        return self._resized_crop(pixels, view)

    def apply_view(self, img: Image.Image, view: View) -> torch.Tensor:
        """(3, size, size) uint8: the view cropped from a PIL image and resized with antialiasing."""
        return self._resized_crop(hwc_tensor(img), view)

    def _resized_crop(self, hwc: torch.Tensor, view: View) -> torch.Tensor:
        crop = hwc[view.top:view.top + view.h, view.left:view.left + view.w].permute(2, 0, 1)[None]
        mode = self._MODES[self.interpolation.value]
        out = nnf.interpolate(crop, size=(self.size, self.size), mode=mode, antialias=mode != "nearest-exact")[0]
        return (out.flip(-1) if view.flip else out).contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> fp32 (x / 255 - mean) / std: to_tensor + normalise, bit for bit."""
        if batch.dtype != torch.uint8:
            raise PromptKDError(f"expected a uint8 image batch from the uint8 renderer, got {batch.dtype}")
        return self.normalizer(batch.device)(batch)

    def normalizer(self, device: torch.device):
        device = torch.device(device)
        if device not in self._stats:  # made once per device: no host-to-device copy per batch
            self._stats[device] = tuple(torch.tensor(v, device=device).view(3, 1, 1) for v in (self.mean, self.std))
        mean, std = self._stats[device]
        return lambda batch: batch.float().div(255).sub(mean).div(std)


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


def transforms_for(preprocess_cfg: dict | None = None, scale=None,
                   renderer: str = "pil") -> tuple[TrainTransform, TestTransform]:
    """Train and test transforms for an open_clip model's `visual.preprocess_cfg` (CLIP defaults for
    missing keys), so a student with other normalisation or resolution gets its own inputs.

    The random-resized-crop scale is `scale`, else the config's `crop_scale` (the toy models set
    one: at 48 px an 8% crop often misses the object), else the official (0.08, 1).
    `renderer` "uint8" gives the fast train renderer (Uint8TrainTransform, normalised on the
    device); the test transform is always the official PIL one, so accuracies stay comparable.
    """
    if renderer not in RENDERERS:
        raise PromptKDError(f"renderer must be one of {', '.join(RENDERERS)}, got {renderer!r}")
    cfg = dict(preprocess_cfg or {})
    scale = tuple(scale or cfg.get("crop_scale") or (0.08, 1.0))
    size = cfg.get("size", CLIP_SIZE)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise PromptKDError(f"non-square input size {tuple(size)} is not supported")
        size = size[0]
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    interpolation = cfg.get("interpolation", "bicubic")
    train_cls = Uint8TrainTransform if renderer == "uint8" else TrainTransform
    train = train_cls(size, mean, std, scale=scale, interpolation=interpolation)
    test = TestTransform(size, mean, std, interpolation, cfg.get("resize_mode", "shortest"))
    return train, test
