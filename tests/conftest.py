"""Shared fixtures: tiny open_clip architectures written as JSON configs (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch


def tiny_config(width=32, layers=2, patch=8, image=32, embed=24, text_width=32, text_layers=2, ctx=16):
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch, "head_width": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": text_layers},
    }


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def tiny_configs(tmp_path):
    """Paths to a tiny 'teacher' (wider, 3 layers) and 'student' config."""
    t = tmp_path / "tiny-teacher.json"
    s = tmp_path / "tiny-student.json"
    t.write_text(json.dumps(tiny_config(width=48, layers=3, embed=32, text_layers=3)))
    s.write_text(json.dumps(tiny_config(width=32, layers=2, embed=24)))
    return t, s
