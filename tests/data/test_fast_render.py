"""The fast (uint8) training renderer: the same views as the PIL renderer, pixels within rounding of
PIL's bicubic, odd files decoded as load_rgb decodes them, large JPEGs decoded reduced, and the
bad-image policy unchanged."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tinyclip import load_benchmark

from promptkd.data.dataset import ImageDataset, ImageSource, Item, load_rgb
from promptkd.data.transforms import TrainTransform, Uint8TrainTransform, View, transforms_for
from promptkd.errors import PromptKDError

photos = load_benchmark("photos")


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("photo") / "photo.jpg"
    p.write_bytes(photos.photo_jpeg(0, 160, 120))
    return str(p)


def test_same_views_and_pixels_within_rounding_of_pil(photo):
    pil, fast = TrainTransform(64), Uint8TrainTransform(64)
    diffs = []
    for seed in range(12):
        a, view_a = pil.draw(ImageSource(photo), gen(seed))
        b, view_b = fast.draw(ImageSource(photo), gen(seed))
        assert view_a == view_b and b.dtype == torch.uint8 and b.shape == (3, 64, 64)
        # PIL's own uint8 rendering of the view, independently of both transforms
        ref = TF.resized_crop(load_rgb(photo), *view_a[:4], [64, 64], interpolation=TF.InterpolationMode.BICUBIC)
        ref = torch.from_numpy(np.array(ref.transpose(Image.FLIP_LEFT_RIGHT) if view_a.flip else ref)).permute(2, 0, 1)
        d = (b.int() - ref.int()).abs()
        assert d.max() <= 4
        diffs.append(d.float().mean().item())
        # in normalised units the two renderers differ by that rounding only (1 level = 0.015)
        assert (fast.normalize(b[None])[0] - a).abs().mean() < 0.005
    assert np.mean(diffs) < 0.1


def test_normalize_is_to_tensor_then_normalize_bit_for_bit():
    x = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    fast = Uint8TrainTransform(7, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    want = torch.stack([TF.normalize(TF.to_tensor(TF.to_pil_image(im)), fast.mean, fast.std) for im in x])
    assert torch.equal(fast.normalize(x), want)
    with pytest.raises(PromptKDError, match="uint8"):
        fast.normalize(x.float())


def _square(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    files = {"grey.jpg": Image.fromarray(rgb[..., 0], "L"), "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
             "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
             "sixteen.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
             "palette.gif": Image.fromarray(rgb).convert("P")}
    out = {}
    for name, im in files.items():
        im.save(folder / name)
        out[name] = str(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": load_rgb does not rotate, neither does the fast path
    Image.fromarray(rgb).save(folder / "exif.jpg", exif=exif.tobytes())
    out["exif.jpg"] = str(folder / "exif.jpg")
    return out


def test_odd_files_decode_exactly_as_load_rgb(tmp_path):
    fast = Uint8TrainTransform(16)
    for name, path in _square(tmp_path).items():
        x = fast.render(ImageSource(path), View(0, 0, 16, 16, False))  # the whole image at its own size
        want = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert torch.equal(x, want), name


def test_large_jpeg_crop_is_decoded_reduced(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    path.write_bytes(photos.photo_jpeg(1, 1000, 800))
    fast = Uint8TrainTransform(100)
    asked = []
    real = ImageSource.pixels
    monkeypatch.setattr(ImageSource, "pixels", lambda self, r=1: asked.append(r) or real(self, r))
    view = View(50, 70, 700, 820, True)  # both sides >= 4 x 100 px, < 8 x
    x = fast.render(ImageSource(str(path)), view)
    assert asked == [4]
    full = fast.apply_view(load_rgb(str(path)), view)  # the same view from the full decode
    d = (x.int() - full.int()).abs().float()
    assert d.mean() < 3 and x.shape == full.shape
    small = View(50, 70, 150, 300, False)  # a crop under 2x the output: full decode
    asked.clear()
    fast.render(ImageSource(str(path)), small)
    assert asked == [1]


def test_render_depends_only_on_file_and_view(tmp_path):
    """A cache renders K views from one opened source; distillation renders each view alone."""
    path = tmp_path / "big.jpg"
    path.write_bytes(photos.photo_jpeg(2, 900, 700))
    fast = Uint8TrainTransform(96)
    views = [View(0, 0, 700, 800, False), View(10, 20, 100, 120, True), View(5, 5, 400, 500, False)]
    shared = ImageSource(str(path))
    together = [fast.render(shared, v) for v in views]
    for v, x in zip(views, together):
        assert torch.equal(fast.render(ImageSource(str(path)), v), x)


def test_unreadable_jpeg_is_substituted_or_named(tmp_path, photo):
    data = Path(photo).read_bytes()
    items = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(data if i != 1 else data[: len(data) // 3])  # the header reads, the pixels do not
        items.append(Item(str(p), i))
    ds = ImageDataset(items, Uint8TrainTransform(32), seed=1)
    x, label, used = ds[1]
    assert (label, used) == (2, 2) and x.dtype == torch.uint8 and ds.unreadable_count() == 1
    ds.set_on_bad_image("error")
    with pytest.raises(PromptKDError, match=r"1\.jpg: cannot read image"):
        ds[1]


def test_renderer_choice_and_refusals():
    train, test = transforms_for({"size": 32}, renderer="uint8")
    assert isinstance(train, Uint8TrainTransform) and train.renderer == "uint8" and not hasattr(test, "renderer")
    assert type(transforms_for({"size": 32})[0]) is TrainTransform
    with pytest.raises(PromptKDError, match="renderer"):
        transforms_for({}, renderer="fast")
    with pytest.raises(PromptKDError, match="uint8 renderer"):
        Uint8TrainTransform(32, interpolation="lanczos")
