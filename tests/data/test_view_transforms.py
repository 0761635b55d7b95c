import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from promptkd.data import TestTransform, TrainTransform, View, sample_view, transforms_for
from promptkd.data.transforms import CLIP_MEAN, CLIP_STD
from promptkd.errors import PromptKDError


def image(w=32, h=24, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size", [(32, 24), (24, 32), (30, 3), (3, 30), (1, 1)])  # thin ones hit the fallback
def test_sample_view_equals_torchvision_draw_for_draw(size):
    img = image(*size)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        assert sample_view(*size, gen(seed)) == View(*expected, flip)


def test_train_transform_equals_official_pipeline():
    img = image()
    official = T.Compose([
        T.RandomResizedCrop(16, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    tf = TrainTransform(16, CLIP_MEAN, CLIP_STD)
    for seed in range(5):
        torch.manual_seed(seed)
        assert torch.equal(tf(img, gen(seed))[0], official(img))


def test_same_seed_same_view_and_replay():
    img, tf = image(), TrainTransform(16)
    a, view_a = tf(img, gen(7))
    b, view_b = tf(img, gen(7))
    assert view_a == view_b and torch.equal(a, b)
    assert torch.equal(tf.apply_view(img, view_a), a)
    views = {tf(img, gen(s))[1] for s in range(10)}
    assert len(views) > 1
    assert a.shape == (3, 16, 16)


def test_test_transform_equals_official_pipeline():
    img = image(40, 24)
    official = T.Compose([
        T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16), T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    assert torch.equal(TestTransform(16)(img), official(img))


def test_transforms_for_preprocess_cfg():
    train, test = transforms_for({"size": (20, 20), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                  "interpolation": "bilinear", "resize_mode": "shortest"})
    assert train.size == test.size == 20 and test.mean == [0.5, 0.5, 0.5]
    assert train.interpolation == T.InterpolationMode.BILINEAR
    default_train, default_test = transforms_for({})
    assert default_test.size == 224 and default_train.std == list(CLIP_STD)
    assert transforms_for({"size": 8, "resize_mode": "squash"})[1](image(40, 24)).shape == (3, 8, 8)
    with pytest.raises(PromptKDError, match="non-square"):
        transforms_for({"size": (20, 24)})
    with pytest.raises(PromptKDError, match="resize_mode 'longest'"):
        transforms_for({"resize_mode": "longest"})
