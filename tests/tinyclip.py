"""Shared test helpers: tiny open_clip architectures as JSON configs, tiny image folders (no downloads),
a simulated kill at a chosen step, and the benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def tiny_config(width=32, layers=2, patch=8, image=32, embed=24, text_width=32, text_layers=2, ctx=16):
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch, "head_width": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": text_layers},
    }


def write_images(root, per_class: int = 6, seed: int = 0, size: int = 32, noise: float = 20.0):
    """Coloured squares with noise and a random darker patch, one folder per class.

    Returns ([(path, label)], class names) as promptkd Items.
    """
    from promptkd.data.dataset import Item

    rng = np.random.default_rng(seed)
    items = []
    for label, (name, rgb) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(np.array(rgb) + rng.normal(0, noise, (size, size, 3)), 0, 255)
            y, x = rng.integers(0, size // 2, 2)
            a[y : y + size // 3, x : x + size // 3] *= 0.5
            path = folder / f"{i}.png"
            Image.fromarray(a.astype(np.uint8)).save(path)
            items.append(Item(str(path), label))
    return items, list(COLOURS)


@contextlib.contextmanager
def killed_at_call(owner, name: str, n: int, after: bool = False):
    """Inside the block, `owner.name` raises KeyboardInterrupt at its n-th call (before running it,
    or just after with `after=True`): a kill at a chosen step. The block must be interrupted;
    the original is back afterwards."""
    real = getattr(owner, name)
    calls = 0

    def dying(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n and not after:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if calls == n:
            raise KeyboardInterrupt
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, dying)
        with pytest.raises(KeyboardInterrupt):
            yield


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package; they import their neighbours)."""
    folder = Path(__file__).parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
