import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.data import ImageDataset, Item, TestTransform, TrainTransform, load_rgb
from promptkd.errors import PromptKDError


@pytest.fixture
def items(tmp_path, make_image):
    return [Item(str(make_image(tmp_path / f"{i}.png", size=(20, 14))), i % 2) for i in range(3)]


def test_train_items_are_deterministic_per_seed_epoch_index(items):
    ds = ImageDataset(items, TrainTransform(8), seed=3)
    x, label, index = ds[2]
    assert x.shape == (3, 8, 8) and label == 0 and index == 2
    assert torch.equal(ds[2][0], x)  # same (seed, epoch, index) -> same view, regardless of order
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], x)
    ds.set_epoch(0)
    assert torch.equal(ImageDataset(items, TrainTransform(8), seed=3)[2][0], x)
    assert not torch.equal(ImageDataset(items, TrainTransform(8), seed=4)[2][0], x)


def test_view_can_be_replayed_from_the_generator(items):
    ds = ImageDataset(items, TrainTransform(8), seed=1)
    x = ds[1][0]
    _, view = ds.transform(load_rgb(items[1].path), ds.generator_for(1))
    assert torch.equal(ds.transform.apply_view(load_rgb(items[1].path), view), x)


def test_eval_mode_uses_test_transform(items):
    x, label, index = ImageDataset(items, TestTransform(8), train=False)[1]
    assert x.shape == (3, 8, 8) and (label, index) == (1, 1)


def test_loader_batches(items):
    loader = torch.utils.data.DataLoader(ImageDataset(items, TrainTransform(8)), batch_size=3)
    x, labels, index = next(iter(loader))
    assert x.shape == (3, 3, 8, 8) and labels.tolist() == [0, 1, 0] and index.tolist() == [0, 1, 2]


def test_load_rgb_modes(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "grey.png")
    assert load_rgb(str(tmp_path / "grey.png")).getpixel((0, 0)) == (100, 100, 100)
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)  # on white
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_rgb(str(tmp_path / "cmyk.jpg")).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert load_rgb(str(tmp_path / "deep.png")).getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert load_rgb(str(tmp_path / "mid.png")).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(PromptKDError, match="bad.jpg: cannot read image"):
        load_rgb(str(tmp_path / "bad.jpg"))
