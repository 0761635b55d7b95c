"""The training checkpoint: what a resumed run needs to continue bit for bit.

One safetensors file (engine.config.CHECKPOINT_NAME) holds the trainable weights and persistent
buffers, the optimiser's momentum, the torch RNG and each `Stateful`'s tensors; its JSON header
holds the position (epoch, step), the progress so far (`TrainResult`), the settings, the Python
and NumPy RNG states and whatever the stage adds (`meta_extra`). `read_header` is the one
resume-compatibility check (the engine's settings and the stage's), from the header alone.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from promptkd.artifacts import load_artifact, read_artifact_meta, save_artifact
from promptkd.engine.config import TrainConfig
from promptkd.errors import PromptKDError

# Settings a checkpoint must share with the run that resumes it (the rest may change).
RESUME_KEYS = ("epochs", "batch_size", "lr", "seed", "precision")


class Stateful(Protocol):
    """Extra training state that must survive a resume (e.g. the teacher's prompt aggregate)."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    steps: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all persistent buffers (BN running stats), by name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable state, to roll back to (`restore`)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(model).items()}


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    full = model.state_dict()
    for k, v in state.items():
        full[k].copy_(v)


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [int(x) for x in np.random.get_state()[1]],
        "numpy_pos": int(np.random.get_state()[2]),
    }


def _restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta.get("rng", {}).get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in meta.get("rng", {}):
        np.random.set_state(("MT19937", np.array(meta["rng"]["numpy"], dtype=np.uint32), meta["rng"]["numpy_pos"], 0, 0.0))
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                    result: TrainResult, cfg: TrainConfig, scaler, extra: list[Stateful], meta_extra: dict) -> None:
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{name_of[id(p)]}"] = buf
    tensors["rng.torch"] = torch.get_rng_state()
    for i, s in enumerate(extra):
        tensors.update({f"extra{i}.{k}": v for k, v in s.state_tensors().items()})
    meta = {
        "kind": "checkpoint",
        "epoch": epoch,
        "step": step,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "seconds": result.seconds,
        "history": result.history,
        "config": asdict(cfg),
        "rng": _rng_state(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        **meta_extra,
    }
    save_artifact(path, tensors, meta)


def check_header(meta: dict, path: Path) -> None:
    """A checkpoint's header has the types this engine writes: a damaged file says so."""
    for key in ("epoch", "step", "steps", "skipped_steps"):
        value = meta.get(key, 0)
        if type(value) is not int or value < 0:
            raise PromptKDError(f"{path}: checkpoint metadata '{key}' must be a non-negative integer, got {value!r}")
    for key, kind in (("config", dict), ("history", list), ("rng", dict), ("partial", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise PromptKDError(f"{path}: checkpoint metadata '{key}' must be a JSON {kind.__name__}")
    if not isinstance(meta.get("seconds", 0.0), (int, float)):
        raise PromptKDError(f"{path}: checkpoint metadata 'seconds' must be a number")


def read_header(path: Path, cfg: TrainConfig, stage: dict[str | None, dict] | None = None) -> dict:
    """The one resume-compatibility check, from the header alone (the tensors are not read): the
    header has the engine's types (`check_header`), and this run may continue the checkpoint. Each
    setting must equal what the checkpoint was written with: the stage's first, then the engine's
    RESUME_KEYS. `stage` maps a header key (a section of the stage's `checkpoint_meta`, e.g.
    "distill"; None: the header's top level) to {setting: this run's value}; a setting the
    checkpoint did not record is not compared, so checkpoints of older versions still resume.
    Returns the header."""
    meta = read_artifact_meta(path, kind="checkpoint")
    check_header(meta, path)
    sections = {**(stage or {}), "config": {key: getattr(cfg, key) for key in RESUME_KEYS}}
    differ = []
    for where, settings in sections.items():
        saved = meta if where is None else meta.get(where)
        saved = saved if isinstance(saved, dict) else {}
        differ += [(key, saved[key], value) for key, value in settings.items() if key in saved and saved[key] != value]
    if differ:
        key, saved, value = differ[0]
        more = f" (other settings differ too: {', '.join(k for k, _, _ in differ[1:])})" if differ[1:] else ""
        raise PromptKDError(f"{path}: cannot resume: checkpoint was written with {key}={_shown(saved)}, "
                            f"this run has {key}={_shown(value)}{more}")
    return meta


def _shown(value: Any, limit: int = 60) -> str:
    """A setting's value in a message: its repr, cut to `limit` characters (a class-name list can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shapes(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors (by name), after checking they are exactly this model's."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = trainable_state(model)
    if set(state) != set(own):
        diff = sorted(set(state) ^ set(own))
        raise PromptKDError(f"{path}: checkpoint does not match this model (differs in {diff[:4]})")
    params = dict(model.named_parameters())
    shapes = {**{k: own[k].shape for k in own}, **{f"optim.{k}": p.shape for k, p in params.items()}}
    for k, v in [*state.items(), *((k, v) for k, v in tensors.items() if k.startswith("optim."))]:
        if k not in shapes or v.shape != shapes[k]:
            raise PromptKDError(f"{path}: checkpoint tensor {k} has shape {tuple(v.shape)}, this model has "
                                f"{tuple(shapes[k]) if k in shapes else 'no such tensor'}")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                    extra: list[Stateful]) -> tuple[int, int, TrainResult, dict]:
    """Restore everything `save_checkpoint` wrote; returns (epoch, step, result so far, header). Whether
    this run may continue it is `read_header`'s to decide, before; here only a damaged header is refused."""
    tensors, meta = load_artifact(path, kind="checkpoint")
    check_header(meta, path)
    restore(model, _check_shapes(path, model, tensors))
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if k.startswith("optim."):
            p = params[k.removeprefix("optim.")]
            optimizer.state[p]["momentum_buffer"] = v.to(p.device).clone()
    for i, s in enumerate(extra):
        prefix = f"extra{i}."
        s.load_state_tensors({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    if meta.get("scaler") and scaler is not None:
        scaler.load_state_dict(meta["scaler"])
    try:
        _restore_rng(meta, tensors)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise PromptKDError(f"{path}: checkpoint holds a corrupt RNG state ({e})") from None
    result = TrainResult(meta.get("history", []), meta.get("steps", 0), meta.get("skipped_steps", 0), meta.get("seconds", 0.0))
    return int(meta["epoch"]), int(meta["step"]), result, meta
