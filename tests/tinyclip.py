"""Shared test helpers: tiny open_clip architectures as JSON configs, tiny image folders (no downloads),
a simulated kill at a chosen step, and the benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def tiny_config(width=32, layers=2, patch=8, image=32, embed=24, text_width=32, text_layers=2, ctx=16):
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch, "head_width": 16},
        "text_cfg": {"context_length": ctx, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": text_layers},
    }


# The tiny teacher (wider, 3 layers) and student CLIP shapes most tests use.
TEACHER_SHAPE = dict(width=48, layers=3, embed=32, text_layers=3)
STUDENT_SHAPE = dict(width=32, layers=2, embed=24)


def write_tiny_configs(folder: Path) -> tuple[Path, Path]:
    """folder/tiny-teacher.json and folder/tiny-student.json (TEACHER_SHAPE, STUDENT_SHAPE)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    t, s = folder / "tiny-teacher.json", folder / "tiny-student.json"
    t.write_text(json.dumps(tiny_config(**TEACHER_SHAPE)))
    s.write_text(json.dumps(tiny_config(**STUDENT_SHAPE)))
    return t, s


# The buffers OpenAI's CLIP files carry besides the weights (open_clip's CLIP has none of them).
OPENAI_BUFFERS = ("input_resolution", "context_length", "vocab_size")


def openai_buffers(image_size: int, context_length: int) -> dict[str, torch.Tensor]:
    return dict(zip(OPENAI_BUFFERS, (torch.tensor(image_size), torch.tensor(context_length), torch.tensor(49408))))


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


# ------------------------------------------------------------------ OpenAI-format CLIPs, by hand


def openai_config(width=128, layers=2, patch=8, image=32, embed=48, text_width=128, text_layers=2, ctx=16):
    """An open_clip model config that, like most hand-written ones, sets no head counts."""
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch},
        "text_cfg": {"context_length": ctx, "vocab_size": 49408, "width": text_width, "layers": text_layers},
    }


def openai_state_dict(width=128, layers=2, patch=8, image=32, embed=48, text_width=128, text_layers=2, ctx=16,
                      seed=0, dtype=None):
    """Random weights under the key names of OpenAI's CLIP archives, with their extra buffers
    (`input_resolution`, `context_length`, `vocab_size`) that mark the OpenAI format. No open_clip
    code makes them, so tests built on them check the loader against OpenAI's definition."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd = {}

    def norm(name, w):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(w, std=0.1), r(w, std=0.1)

    def blocks(prefix, w, n):
        for i in range(n):
            p = f"{prefix}transformer.resblocks.{i}."
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * w, w, std=w**-0.5), r(3 * w, std=0.1)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(w, w, std=w**-0.5), r(w, std=0.1)
            norm(p + "ln_1", w)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * w, w, std=w**-0.5), r(4 * w, std=0.1)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(w, 4 * w, std=(4 * w) ** -0.5), r(w, std=0.1)
            norm(p + "ln_2", w)

    grid = image // patch
    sd["visual.conv1.weight"] = r(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd["visual.class_embedding"] = r(width)
    sd["visual.positional_embedding"] = r(grid * grid + 1, width, std=0.5)
    norm("visual.ln_pre", width)
    blocks("visual.", width, layers)
    norm("visual.ln_post", width)
    sd["visual.proj"] = r(width, embed, std=width**-0.5)
    sd["token_embedding.weight"] = r(49408, text_width)
    sd["positional_embedding"] = r(ctx, text_width, std=0.5)
    blocks("", text_width, text_layers)
    norm("ln_final", text_width)
    sd["text_projection"] = r(text_width, embed, std=text_width**-0.5)
    sd["logit_scale"] = torch.tensor(4.6052)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd.update(openai_buffers(image, ctx))
    return sd


def _ref_block(sd, p, x, heads, mask=None):
    """One residual attention block of OpenAI's CLIP: pre-LN, `heads`-head attention, QuickGELU MLP."""
    b, t, w = x.shape

    def ln(name, y):
        return F.layer_norm(y, (w,), sd[f"{p}{name}.weight"].float(), sd[f"{p}{name}.bias"].float(), eps=1e-5)

    def heads_of(y):
        return y.reshape(b, t, heads, w // heads).transpose(1, 2)

    q, k, v = (ln("ln_1", x) @ sd[p + "attn.in_proj_weight"].float().T + sd[p + "attn.in_proj_bias"].float()).split(w, -1)
    a = heads_of(q) @ heads_of(k).transpose(-1, -2) / math.sqrt(w // heads)
    if mask is not None:
        a = a + mask
    o = (a.softmax(-1) @ heads_of(v)).transpose(1, 2).reshape(b, t, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].float().T + sd[p + "attn.out_proj.bias"].float()
    h = ln("ln_2", x) @ sd[p + "mlp.c_fc.weight"].float().T + sd[p + "mlp.c_fc.bias"].float()
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[p + "mlp.c_proj.weight"].float().T + sd[p + "mlp.c_proj.bias"].float()


def reference_image_features(sd, images, heads, prompts=None):
    """OpenAI's image tower written out from its definition (unnormalised features).

    `prompts` ({0: input prompts, i: prompts of block i}) adds IVLP deep vision prompts by the
    official rule: appended after CLS + patches and the positional embedding, before ln_pre, and
    the last n tokens replaced at the entry of each block i >= 1 that has prompts.
    """
    conv = sd["visual.conv1.weight"].float()
    w = conv.shape[0]
    x = F.conv2d(images, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].float().expand(len(images), 1, w)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"].float()
    prompts = {i: p.float() for i, p in (prompts or {}).items()}
    n = len(prompts[0]) if prompts else 0
    if n:
        x = torch.cat([x, prompts[0].expand(len(images), -1, -1)], 1)
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"].float(), sd["visual.ln_pre.bias"].float(), eps=1e-5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(layers):
        if i >= 1 and i in prompts:
            x = torch.cat([x[:, :-n], prompts[i].expand(len(images), -1, -1)], 1)
        x = _ref_block(sd, f"visual.transformer.resblocks.{i}.", x, heads)
    x = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"].float(), sd["visual.ln_post.bias"].float(), eps=1e-5)
    return x @ sd["visual.proj"].float()


def reference_text_features(sd, tokens, heads, prompts=None):
    """OpenAI's text tower written out from its definition (unnormalised features); `prompts`
    ({0: context, i: prompts of block i}) replace token positions 1..n, as IVLP does."""
    x = sd["token_embedding.weight"].float()[tokens]
    t, w = x.shape[1], x.shape[2]
    prompts = {i: p.float() for i, p in (prompts or {}).items()}
    n = len(prompts[0]) if prompts else 0

    def put(y, ctx):
        return torch.cat([y[:, :1], ctx.expand(len(y), -1, -1), y[:, 1 + n :]], 1)

    if n:
        x = put(x, prompts[0])
    x = x + sd["positional_embedding"].float()[:t]
    mask = torch.full((t, t), float("-inf")).triu(1)
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        if i >= 1 and i in prompts:
            x = put(x, prompts[i])
        x = _ref_block(sd, f"transformer.resblocks.{i}.", x, heads, mask)
    x = F.layer_norm(x, (w,), sd["ln_final.weight"].float(), sd["ln_final.bias"].float(), eps=1e-5)
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ sd["text_projection"].float()


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package; they import their neighbours)."""
    folder = Path(__file__).parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(err: str) -> str:
    """A command's error as the CLI promises it: one line on stderr, no traceback (stripped)."""
    err = err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# Oracles for accuracy and HM, in plain Python: expected values never come from the code under test.
def plain_top1(features, labels, vectors, candidates) -> float:
    """Percent of rows whose best-scoring candidate class (plain dot products, first maximum) is the label."""
    correct = 0
    for f, y in zip(features, labels):
        scores = [sum(a * b for a, b in zip(f, vectors[c])) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        correct += candidates[best] == y
    return 100.0 * correct / len(labels)


def hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b)
