"""Tiny teacher fixtures: a tiny CLIP with weights in a file (so it reloads identically) and a tiny
labelled image folder (train/ and val/, four classes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.data.folders import folder_dataset
from promptkd.engine import TrainConfig
from promptkd.models import load_clip
from promptkd.stages.teacher import TeacherConfig

CLASSES = ("apple", "banana", "cherry", "grape")
COLOURS = ((200, 40, 40), (230, 210, 40), (120, 10, 40), (90, 40, 140))


@pytest.fixture
def tiny_clip(tiny_configs, tmp_path):
    """(config JSON, weights file) of a tiny teacher CLIP."""
    from safetensors.torch import save_file

    config = tiny_configs[0]
    clip = load_clip(str(config), None, init_seed=123)
    weights = tmp_path / "tiny-teacher-weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    return str(config), str(weights)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "fruit"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for name, colour in zip(CLASSES, COLOURS):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(colour) + rng.normal(0, 30, (36, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture
def fruit(image_folder):
    return folder_dataset(image_folder)


@pytest.fixture
def make_config(tiny_clip):
    """TeacherConfig factory for the tiny CLIP: 2 epochs of batch 4, depth 2, 2 prompt tokens, on the CPU."""

    def make(**kw) -> TeacherConfig:
        train = dict(epochs=2, batch_size=4, lr=0.01, warmup_epochs=0, progress=False, device="cpu")
        train.update(kw.pop("train", {}))
        base = dict(model=tiny_clip[0], weights=tiny_clip[1], vision_depth=2, text_depth=2, n_ctx_vision=2,
                    n_ctx_text=2, gpa_mean=2, gpa_std=1, eval_batch_size=4, train=TrainConfig(**train))
        base.update(kw)
        return TeacherConfig(**base)

    return make


@pytest.fixture
def make_teacher(tiny_clip):
    """A tiny Teacher with prompts drawn from `seed` (same CLIP weights every time)."""
    from promptkd.models.wrappers import Teacher

    def make(seed: int = 1) -> Teacher:
        torch.manual_seed(seed)
        return Teacher(load_clip(tiny_clip[0], tiny_clip[1]), 2, 2, 2, 2)

    return make
