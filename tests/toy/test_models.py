"""The tiny CLIPs: standard open_clip models, shipped weights, trimmed-vocabulary round trip."""

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer

from promptkd.errors import PromptKDError
from promptkd.toy.models import (
    build_toy_clip,
    image_tower_macs,
    load_toy_weights,
    save_toy_weights,
    toy_model_names,
    toy_weights_path,
)
from promptkd.toy.pretrain import normalize_images
from promptkd.toy.world import World


def test_names_and_student_is_much_cheaper():
    assert toy_model_names() == ["toy-teacher", "toy-student"]
    assert image_tower_macs("toy-teacher") >= 4 * image_tower_macs("toy-student")


@pytest.mark.parametrize("name", ["toy-teacher", "toy-student"])
def test_random_init_is_a_standard_open_clip_model(name):
    model, preprocess_cfg, tokenizer = build_toy_clip(name, pretrained=False)
    assert type(model) is CLIP and isinstance(model.visual, VisionTransformer)
    assert model.visual.pool_type == "tok"
    assert not model.training
    assert preprocess_cfg["size"] == 48
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert tokenizer.context_length == model.context_length
    assert name in open_clip.list_models()


@pytest.mark.parametrize("name", ["toy-teacher", "toy-student"])
def test_shipped_weights_load_and_give_finite_features(name):
    path = toy_weights_path(name)
    if not path.is_file():
        pytest.skip(f"{path} not shipped yet")
    model, _, tokenizer = build_toy_clip(name)
    images, captions = World(0).pretrain_batch(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = model.encode_image(normalize_images(images))
        txt = model.encode_text(tokenizer(captions))
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert img.shape[1] == txt.shape[1] == model.text_projection.shape[1]


def test_shipped_files_are_small():
    total = sum(toy_weights_path(n).stat().st_size for n in toy_model_names() if toy_weights_path(n).is_file())
    assert total <= 20 * 1024 * 1024


def test_trimmed_round_trip_equals_untrimmed_text_features(tmp_path):
    torch.manual_seed(0)
    model, _, tokenizer = build_toy_clip("toy-student", pretrained=False)
    path = save_toy_weights(model, tmp_path / "s.safetensors", "toy-student")
    assert path.stat().st_size < model.token_embedding.weight.numel() * 4  # the table was trimmed
    reloaded, _, _ = build_toy_clip("toy-student", weights=path)
    world = World(0)
    _, captions = world.pretrain_batch(32, torch.Generator().manual_seed(1))
    captions += [f"a photo of a {c}." for c in world.domain_classnames()]
    images, _ = world.domain_split("val", 1)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokenizer(captions)), reloaded.encode_text(tokenizer(captions)))
        x = normalize_images(images[:4])
        assert torch.equal(model.encode_image(x), reloaded.encode_image(x))


def test_loading_the_wrong_model_is_an_error(tmp_path):
    model, _, _ = build_toy_clip("toy-student", pretrained=False)
    path = save_toy_weights(model, tmp_path / "s.safetensors", "toy-student")
    teacher, _, _ = build_toy_clip("toy-teacher", pretrained=False)
    with pytest.raises(PromptKDError, match="toy-teacher"):
        load_toy_weights(teacher, path, "toy-teacher")
    with pytest.raises(PromptKDError, match="not found"):
        load_toy_weights(teacher, tmp_path / "missing.safetensors", "toy-teacher")
