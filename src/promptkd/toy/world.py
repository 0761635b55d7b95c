"""A procedurally generated image-caption world, for demos and tests that need no files.

Every image is one coloured shape (8 shapes x 8 colours x 4 textures x 3 sizes) on a
background, rendered at 48 x 48 pixels by vectorised torch code (tens of thousands of
images per second on one core). Everything is a pure function of a seed.

Two distributions share the same objects:

* the **pretraining** distribution: plain white / grey / black or mildly noisy
  backgrounds, mild colour jitter, and a caption for every image built from one of the
  80 CLIP ImageNet templates (``"a bad photo of a large red striped circle."``). It is
  used to pretrain the two tiny CLIPs (``promptkd.toy.pretrain``).
* the **domain** distribution, the downstream task: 24 named classes
  (``"blue circle"``, ``"red star"``, ...: a colour and a shape, words the captions
  use), seen under warm coloured light (a fixed per-channel tint), on cluttered, noisy
  backgrounds, with stronger colour and brightness jitter and more size and rotation
  variation (``DOMAIN_SHIFT``). Zero-shot transfer works partly; adapting to the
  domain helps a lot. Classes are in alphabetical order (so a
  folder scan gives the same labels) and, by the official rule, the first
  ``ceil(n / 2)`` are the base classes and the rest the novel ones.

Other domains of the same style, with any classes the words allow, stand in for a user's own
dataset: ``World(seed, classnames=custom_classnames(100))`` (``"<colour> <shape>"`` pairs up to
64 classes, ``"<colour> <texture> <shape>"`` beyond, up to 256).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from promptkd.artifacts import atomic_open
from promptkd.errors import PromptKDError

IMAGE_SIZE = 48

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "crescent")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (30, 165, 55),
    "cyan": (30, 205, 215),
    "blue": (35, 65, 220),
    "purple": (135, 45, 190),
    "pink": (250, 135, 195),
}
COLOUR_NAMES = tuple(COLOURS)
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "medium", "large")
PRETRAIN_BACKGROUNDS = ("white", "grey", "black", "noisy", "cluttered")

# Radius of the shape in pixels per size, (low, high).
_SIZE_RANGES = {"small": (7.0, 10.0), "medium": (10.0, 13.5), "large": (13.5, 17.5)}

# How the domain differs from pretraining (the pretraining style is fixed in render()'s helpers).
DOMAIN_SHIFT = {
    "size_factor": (0.85, 1.10),  # radius multiplier range
    "rotation_deg": 30.0,  # pretraining: 20
    "channel_gain_jitter": 0.2,  # per-channel colour gain in 1 +- this
    "brightness": (0.75, 1.15),
    "colour_offset": 20.0,  # per-channel additive jitter, pretraining: 14
    "clutter_saturation": 0.25,  # pretraining's "cluttered" background: 0.3
    "ramp": 30.0,  # brightness ramp across the image, pretraining's "cluttered": 40
    "noise_sigma": (4.0, 12.0),  # pixel noise; pretraining: 2, or 20-32 when "noisy"
    "tint": (1.2, 1.0, 0.75),  # per-channel gain of the whole image (coloured light)
}

# Each shape is paired with three colours: class k of shape s has colour (s + offset_k) % 8.
_DOMAIN_COLOUR_OFFSETS = (0, 3, 5)

# Caption templates: the 80 CLIP ImageNet templates (they include the 60 that PromptSRC
# averages for its frozen text features), so every word those templates use is trained.
CAPTION_TEMPLATES = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
SIMPLE_TEMPLATE = "a photo of a {}."


def _seed_of(*parts) -> int:
    """A stable 63-bit seed from strings/ints (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) * 2654435761 % (2**63 - 1)


def domain_classnames() -> list[str]:
    """The 24 domain class names, ``"<colour> <shape>"``, in label (alphabetical) order."""
    names = []
    for offset in _DOMAIN_COLOUR_OFFSETS:
        for s, shape in enumerate(SHAPES):
            names.append(f"{COLOUR_NAMES[(s + offset) % len(COLOUR_NAMES)]} {shape}")
    return sorted(names)


def custom_classnames(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct domain classes drawn at random (``seed``), in label (alphabetical) order:
    ``"<colour> <shape>"`` pairs for up to 64 classes, ``"<colour> <texture> <shape>"`` triples
    for 65 to 256 (never both, so no class contains another)."""
    pairs = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    pool = pairs if n <= len(pairs) else [f"{c} {t} {s}" for c in COLOUR_NAMES for t in TEXTURES for s in SHAPES]
    if not 1 <= n <= len(pool):
        raise PromptKDError(f"a toy domain has 1 to {len(pool)} classes, not {n}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(_seed_of("classes", seed, n)))
    return sorted(pool[i] for i in order[:n].tolist())


def _class_attributes(name: str) -> tuple[int, int, int]:
    """(colour, shape, texture) indices of a class name; texture -1 when the name leaves it free."""
    words = name.split(" ")
    ok = len(words) in (2, 3) and words[0] in COLOUR_NAMES and words[-1] in SHAPES
    if not ok or (len(words) == 3 and words[1] not in TEXTURES):
        raise PromptKDError(f"toy class {name!r} is not '<colour> [<texture>] <shape>' with colour in "
                            f"{COLOUR_NAMES}, texture in {TEXTURES}, shape in {SHAPES}")
    texture = TEXTURES.index(words[1]) if len(words) == 3 else -1
    return COLOUR_NAMES.index(words[0]), SHAPES.index(words[-1]), texture


def _rotate(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor):
    c, s = torch.cos(theta), torch.sin(theta)
    return x * c + y * s, -x * s + y * c


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (in radius units) of each pixel to its image's shape.

    ``shape``: (B,) ints; ``u, v``: (B, H, W) coordinates in the shape's frame, scaled so
    that the shape's outer radius is 1.
    """
    rho = torch.sqrt(u * u + v * v + 1e-12)
    phi = torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    # circle
    dist = [rho - 1.0]
    # square (half side 0.8)
    dist.append(torch.maximum(au, av) - 0.8)
    # triangle (circumradius 1, pointing up; image y grows downwards)
    normals = [(0.0, 1.0), (math.cos(math.radians(-30)), -0.5), (math.cos(math.radians(210)), -0.5)]
    dist.append(torch.stack([nx * u + ny * v for nx, ny in normals]).amax(0) - 0.5)
    # diamond
    dist.append((au + av - 1.0) / math.sqrt(2.0))
    # cross (plus sign)
    arm = 0.34
    dist.append(torch.minimum(torch.maximum(au - 1.0, av - arm), torch.maximum(au - arm, av - 1.0)))
    # ring
    dist.append((rho - 0.68).abs() - 0.32)
    # star (five points)
    t = torch.remainder(5.0 * (phi + math.pi / 2) / (2 * math.pi), 1.0)
    tri = (2.0 * t - 1.0).abs()
    dist.append((rho - (0.42 + 0.58 * tri**2)) * 0.7)
    # crescent: a disc minus a shifted disc
    dist.append(torch.maximum(rho - 1.0, 0.78 - torch.sqrt((u - 0.5) ** 2 + v * v)))
    stacked = torch.stack(dist)  # (S, B, H, W)
    d = stacked.gather(0, shape.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)
    return d


def _grid(size: int):
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return xx, yy


def _clutter(n, image_size, rand, saturation, ramp, xx):
    """Low-frequency, partly desaturated colour blobs plus a left-right brightness ramp."""
    coarse = rand(n, 3, 5, 5) * 255
    grey = coarse.mean(1, keepdim=True)
    coarse = grey + (coarse - grey) * saturation
    bg = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return bg + (xx / image_size - 0.5).view(1, 1, image_size, image_size) * (2 * rand(n, 1, 1, 1) - 1) * ramp


def _placement(size: torch.Tensor, rand, domain: bool, image_size: int):
    """Radius, centre and rotation of each image's shape (pixels, radians)."""
    n = size.shape[0]
    lo = torch.tensor([_SIZE_RANGES[s][0] for s in SIZES])[size]
    hi = torch.tensor([_SIZE_RANGES[s][1] for s in SIZES])[size]
    radius = lo + (hi - lo) * rand(n)
    if domain:
        lo_f, hi_f = DOMAIN_SHIFT["size_factor"]
        radius = radius * (lo_f + (hi_f - lo_f) * rand(n))
    margin = radius + 1.0
    span = image_size - 2 * margin
    cx = margin + span * rand(n)
    cy = margin + span * rand(n)
    max_rot = math.radians(DOMAIN_SHIFT["rotation_deg"] if domain else 20)
    theta = (2 * rand(n) - 1) * max_rot
    return radius, cx, cy, theta


def _fill(colour: torch.Tensor, rand, domain: bool) -> torch.Tensor:
    """Fill colour (B, 3, 1, 1) with per-image jitter."""
    n = colour.shape[0]
    shift = DOMAIN_SHIFT
    base = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)[colour]  # (B, 3)
    if domain:
        gj, (b_lo, b_hi) = shift["channel_gain_jitter"], shift["brightness"]
        gains = 1 - gj + 2 * gj * rand(n, 3)
        fill = base * gains * (b_lo + (b_hi - b_lo) * rand(n, 1)) + (2 * rand(n, 3) - 1) * shift["colour_offset"]
    else:
        fill = base + (2 * rand(n, 3) - 1) * 14
    return fill.view(n, 3, 1, 1)


def _shade(texture: torch.Tensor, pu: torch.Tensor, pv: torch.Tensor, rand) -> torch.Tensor:
    """Texture: the factor (B, 1, H, W) that darkens part of the fill in a pattern tied to the shape's frame."""
    period = (3.0 + 1.5 * rand(texture.shape[0])).view(-1, 1, 1)
    su = torch.sin(pu * math.pi / period * 2)
    sv = torch.sin(pv * math.pi / period * 2)
    patterns = torch.stack(
        [
            torch.zeros_like(su),
            (su > 0).float(),
            ((su > 0.3) & (sv > 0.3)).float(),
            ((su > 0) ^ (sv > 0)).float(),
        ]
    )
    pattern = patterns.gather(0, texture.view(1, -1, 1, 1).expand(1, *su.shape)).squeeze(0)
    return 1.0 - 0.55 * pattern.unsqueeze(1)


def _background(background: str | torch.Tensor, n: int, image_size: int, rand, xx: torch.Tensor):
    """Background images (B, 3, H, W) and each image's pixel noise sigma (B, 1, 1, 1)."""
    shift = DOMAIN_SHIFT
    if isinstance(background, str):
        # Domain: strong clutter, a brightness ramp and more noise on every image.
        bg = _clutter(n, image_size, rand, saturation=shift["clutter_saturation"], ramp=shift["ramp"], xx=xx)
        n_lo, n_hi = shift["noise_sigma"]
        noise_sigma = (n_lo + (n_hi - n_lo) * rand(n)).view(-1, 1, 1, 1)
    else:
        levels = torch.tensor([[238.0, 22.0], [128.0, 22.0], [18.0, 18.0], [128.0, 28.0], [0.0, 0.0]])[background]
        level = levels[:, 0] + (2 * rand(n) - 1) * levels[:, 1]
        bg = level.view(-1, 1, 1, 1).expand(n, 3, image_size, image_size).clone()
        cluttered = background == PRETRAIN_BACKGROUNDS.index("cluttered")
        bg[cluttered] = _clutter(n, image_size, rand, saturation=0.3, ramp=40.0, xx=xx)[cluttered]
        noisy = (background == PRETRAIN_BACKGROUNDS.index("noisy")).float()
        noise_sigma = (2 + 30 * noisy * (0.6 + 0.4 * rand(n))).view(-1, 1, 1, 1)
    return bg, noise_sigma


def render(
    shape: torch.Tensor,
    colour: torch.Tensor,
    texture: torch.Tensor,
    size: torch.Tensor,
    background: str | torch.Tensor,
    generator: torch.Generator,
    domain: bool,
    image_size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Render a batch; returns uint8 images (B, 3, H, W). All randomness comes from ``generator``,
    drawn in a fixed order (placement, fill, texture, background, noise: the helpers' call order),
    so the same seed gives the same images bit for bit.

    ``shape, colour, texture, size``: (B,) int tensors indexing SHAPES, COLOUR_NAMES,
    TEXTURES, SIZES. ``background``: (B,) ints indexing PRETRAIN_BACKGROUNDS, or
    ``"domain"`` for the cluttered domain backgrounds.
    """
    g = generator
    n = shape.shape[0]

    def rand(*s):
        return torch.rand(*s, generator=g)

    radius, cx, cy, theta = _placement(size, rand, domain, image_size)
    xx, yy = _grid(image_size)
    dx = xx.unsqueeze(0) - cx.view(-1, 1, 1)
    dy = yy.unsqueeze(0) - cy.view(-1, 1, 1)
    pu, pv = _rotate(dx, dy, theta.view(-1, 1, 1))  # pixel units, shape frame
    r = radius.view(-1, 1, 1)
    dist_px = _shape_distance(shape, pu / r, pv / r) * r
    alpha = (0.5 - dist_px).clamp(0.0, 1.0)  # one-pixel anti-aliased edge

    fill = _fill(colour, rand, domain)
    fg = fill * _shade(texture, pu, pv, rand)
    bg, noise_sigma = _background(background, n, image_size, rand, xx)
    a = alpha.unsqueeze(1)
    img = fg * a + bg * (1 - a)
    if domain:
        img = img * torch.tensor(DOMAIN_SHIFT["tint"], dtype=torch.float32).view(1, 3, 1, 1)
    img = img + torch.randn(img.shape, generator=g) * noise_sigma
    return img.round().clamp(0, 255).to(torch.uint8)


def describe(colour: int | None, shape: int | None, texture: int | None, size: int | None,
             background: int | None) -> str:
    """The noun phrase of a caption; attributes given as None are not mentioned."""
    words = []
    if size is not None:
        words.append(SIZES[size])
    if colour is not None:
        words.append(COLOUR_NAMES[colour])
    if texture is not None:
        words.append(TEXTURES[texture])
    words.append(SHAPES[shape] if shape is not None else "shape")
    phrase = " ".join(words)
    if background is not None:
        phrase += f" on a {PRETRAIN_BACKGROUNDS[background]} background"
    return phrase


class World:
    """The toy world. ``seed`` offsets every sample the world draws; ``classnames`` replaces the 24
    domain classes by others (see ``custom_classnames``; labels follow their alphabetical order)."""

    image_size = IMAGE_SIZE

    def __init__(self, seed: int = 0, classnames: list[str] | None = None):
        self.seed = int(seed)
        self._classnames = sorted(classnames) if classnames is not None else domain_classnames()
        if not self._classnames or len(set(self._classnames)) != len(self._classnames):
            raise PromptKDError("toy classes must be distinct, and at least one")
        self._class_attrs = torch.tensor([_class_attributes(c) for c in self._classnames])

    # -- domain -------------------------------------------------------------------------
    def domain_classnames(self) -> list[str]:
        return list(self._classnames)

    @property
    def n_classes(self) -> int:
        return len(self._classnames)

    @property
    def n_base(self) -> int:
        """Base classes are labels ``0 .. n_base - 1`` (the official ``ceil(n / 2)``)."""
        return math.ceil(self.n_classes / 2)

    def domain_batch(self, labels: torch.Tensor, generator: torch.Generator, shifted: bool = True) -> torch.Tensor:
        """uint8 images (B, 3, 48, 48) of the given domain class labels.

        ``shifted=False`` draws the same classes in the pretraining style (plain
        backgrounds, mild jitter) instead of the domain style.
        """
        labels = torch.as_tensor(labels, dtype=torch.long)
        n = labels.shape[0]
        colour, shape, fixed = self._class_attrs[labels].unbind(1)
        texture = torch.randint(len(TEXTURES), (n,), generator=generator)
        texture = torch.where(fixed >= 0, fixed, texture)  # drawn either way: the stream stays the same
        size = torch.randint(len(SIZES), (n,), generator=generator)
        if not shifted:
            background = torch.randint(len(PRETRAIN_BACKGROUNDS), (n,), generator=generator)
            return render(shape, colour, texture, size, background, generator, domain=False)
        return render(shape, colour, texture, size, "domain", generator, domain=True)

    def domain_split(self, split: str, n_per_class: int, seed: int = 0, chunk: int = 2048):
        """``(images uint8 (N, 3, 48, 48), labels (N,))`` of one split, ``n_per_class`` per class.

        The splits draw from independent streams, so 'train', 'val' and 'test' never share
        an image; the result depends only on (world seed, split, n_per_class, seed).
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        g = torch.Generator().manual_seed(_seed_of("domain", self.seed, split, seed))
        labels = torch.arange(self.n_classes).repeat_interleave(n_per_class)
        images = torch.cat([self.domain_batch(labels[i:i + chunk], g) for i in range(0, len(labels), chunk)]) \
            if len(labels) else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        return images, labels

    def domain_items(self, split: str, n_per_class: int, seed: int = 0) -> list:
        """``domain_split`` as a list of ``(PIL RGB image, label)`` pairs, for image datasets."""
        from PIL import Image

        images, labels = self.domain_split(split, n_per_class, seed)
        arr = images.permute(0, 2, 3, 1).numpy()
        return [(Image.fromarray(np.ascontiguousarray(a)), int(y)) for a, y in zip(arr, labels.tolist())]

    def write_domain(self, root: str | Path, n_train: int = 64, n_val: int = 8, n_test: int = 50,
                     seed: int = 0) -> Path:
        """Write the domain as a CoOp-style dataset and return ``root``.

        Layout: ``root/images/<class_folder>/<split>_<index>.png`` and
        ``root/split_zhou_Toy.json`` = ``{"train"|"val"|"test": [[path relative to
        root/images, label, classname], ...]}``. Class folders are the class names with
        ``_`` for spaces, so alphabetical folder order equals label order.
        """
        from PIL import Image

        root = Path(root)
        image_dir = root / "images"
        split_json: dict[str, list] = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            images, labels = self.domain_split(split, n, seed)
            arr = images.permute(0, 2, 3, 1).numpy()
            counters = [0] * self.n_classes
            entries = []
            for img, label in zip(arr, labels.tolist()):
                name = self._classnames[label]
                folder = name.replace(" ", "_")
                rel = f"{folder}/{split}_{counters[label]:05d}.png"
                counters[label] += 1
                (image_dir / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(img)).save(image_dir / rel)
                entries.append([rel, label, name])
            split_json[split] = entries
        with atomic_open(root / "split_zhou_Toy.json", "w") as f:  # written last, whole or not at all
            f.write(json.dumps(split_json, indent=0))
        return root

    # -- pretraining --------------------------------------------------------------------
    def pretrain_batch(self, n: int, generator: torch.Generator, return_attributes: bool = False):
        """``(images uint8 (n, 3, 48, 48), captions list[str])`` of the pretraining distribution.

        With ``return_attributes`` also two (n, 5) int tensors (colour, shape, texture,
        size, background): each image's attributes, and what its caption says (-1 where
        the caption is silent).
        """
        g = generator
        shape = torch.randint(len(SHAPES), (n,), generator=g)
        colour = torch.randint(len(COLOUR_NAMES), (n,), generator=g)
        texture = torch.randint(len(TEXTURES), (n,), generator=g)
        size = torch.randint(len(SIZES), (n,), generator=g)
        background = torch.randint(len(PRETRAIN_BACKGROUNDS), (n,), generator=g)
        images = render(shape, colour, texture, size, background, g, domain=False)

        # Which attributes the caption mentions: colour and shape almost always (each alone
        # sometimes, so single words get their own meaning), the others now and then.
        u = torch.rand(n, 6, generator=g)
        say_colour = u[:, 0] > 0.08
        say_shape = (u[:, 1] > 0.08) | ~say_colour
        say_texture = u[:, 2] < 0.5
        say_size = (u[:, 3] < 0.5) & (size != SIZES.index("medium"))
        say_bg = u[:, 4] < 0.3
        simple = u[:, 5] < 0.4
        tmpl = torch.randint(len(CAPTION_TEMPLATES), (n,), generator=g)
        true_attrs = torch.stack([colour, shape, texture, size, background], 1)
        said = torch.stack([say_colour, say_shape, say_texture, say_size, say_bg], 1)
        attrs = torch.where(said, true_attrs, torch.full_like(true_attrs, -1))
        captions = []
        for i in range(n):
            c, s, t, z, b = (None if v < 0 else v for v in attrs[i].tolist())
            phrase = describe(c, s, t, z, b)
            template = SIMPLE_TEMPLATE if simple[i] else CAPTION_TEMPLATES[tmpl[i]]
            captions.append(template.format(phrase))
        if return_attributes:
            return images, captions, true_attrs, attrs
        return images, captions

    @staticmethod
    def caption_matches(true_attrs: torch.Tensor, said_attrs: torch.Tensor) -> torch.Tensor:
        """(B, B) bool: caption j is true of image i (every attribute it mentions matches).

        ``true_attrs``: (B, 5) the images' attributes; ``said_attrs``: (B, 5) what the
        captions mention, -1 where silent (both from ``pretrain_batch(..., True)``).
        """
        said = said_attrs.unsqueeze(0)
        return ((said < 0) | (true_attrs.unsqueeze(1) == said)).all(-1)


def vocabulary_words() -> list[str]:
    """Every text the world's captions and the downstream prompts can contain, as phrases."""
    phrases = list(CAPTION_TEMPLATES) + [SIMPLE_TEMPLATE]
    phrases += list(SHAPES) + list(COLOUR_NAMES) + list(TEXTURES) + list(SIZES)
    phrases += [f"on a {b} background" for b in PRETRAIN_BACKGROUNDS] + ["shape", "X", "x"]
    return [p.replace("{}", " ") for p in phrases]
