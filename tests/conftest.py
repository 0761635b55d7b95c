"""Shared fixtures: tiny open_clip architectures written as JSON configs (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from tinyclip import tiny_config


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
