"""Shared fixtures: tiny open_clip architectures written as JSON configs (no downloads), and every
test pinned to the CPU unless it is marked `gpu`."""

from __future__ import annotations

import functools

import pytest
import torch
from tinyclip import write_tiny_configs

# Read once, before any test hides the device: whether `gpu` tests can run at all.
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device visible")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _unavailable(real):
    """`real` answering False; keeps its __wrapped__ (torch._dynamo reads it when first imported)."""
    return functools.wraps(real)(lambda: False)


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_test(request, monkeypatch):
    """A test not marked `gpu` sees no accelerator: device "auto" (the CLI's and TrainConfig's default)
    resolves to the CPU, in this process and in the processes it starts. Exact-equality checks
    (resume, DDP, caches) are CPU guarantees; on a machine with a GPU they must still run on the CPU."""
    if request.node.get_closest_marker("gpu") is not None:
        return
    monkeypatch.setattr(torch.cuda, "is_available", _unavailable(torch.cuda.is_available))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", _unavailable(mps.is_available))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # subprocesses: the CLI, DDP workers, killable runs


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def tiny_configs(tmp_path):
    """Paths to a tiny 'teacher' (wider, 3 layers) and 'student' config."""
    return write_tiny_configs(tmp_path)
