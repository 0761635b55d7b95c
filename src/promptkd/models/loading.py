"""Load any open_clip CLIP: by name + weights tag, from a local checkpoint, or from a tiny JSON config.

Local checkpoints may be OpenAI's original TorchScript archives (`ViT-L-14.pt`, what the official
repo reads), plain state dicts, open_clip training checkpoints or safetensors. None of them is
ever unpickled with arbitrary code: torch.load runs with weights_only=True, TorchScript archives
are read by an allow-list unpickler that never compiles or runs their code (models/torchscript.py;
torch.jit.load would run it), safetensors has no code at all.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptkd.errors import PromptKDError
from promptkd.logs import quiet_open_clip
from promptkd.models.torchscript import read_torchscript_state_dict

# Buffers that OpenAI state dicts carry and open_clip's CLIP does not.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class ClipBundle:
    """A loaded CLIP with what the stages need to use it and to name it in artifacts."""

    model: nn.Module
    name: str
    pretrained: str | None
    tokenizer: Any
    preprocess_cfg: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """How artifacts refer to this CLIP (a weights file is named by its file name)."""
        pre = self.pretrained
        if pre and Path(pre).exists():
            pre = Path(pre).name
        return {"model": self.name, "pretrained": pre}

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)


def _register_json_config(path: Path) -> str:
    import open_clip

    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PromptKDError(f"{path}: not a readable model config ({e})") from None
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise PromptKDError(f"{path}: model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    open_clip.add_model_config(path)
    return path.stem


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors from a checkpoint file, and whether it is an OpenAI-format CLIP.

    Raises PromptKDError with the file name for anything unreadable or unsafe.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: checkpoint not found")
    torchscript = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        elif torchscript := _is_torchscript(path):
            # Never torch.jit.load: it runs the archive's own __setstate__ code while loading.
            sd = read_torchscript_state_dict(path)
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # name the object, not torch's generic first line
        first = (f"GLOBAL {named.group(1)}" if named else
                 str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise PromptKDError(
            f"{path}: refusing to load: the file holds pickled objects other than tensors ({first[:200]})"
        ) from None
    except Exception as e:  # truncated zips, bad headers, wrong formats all land here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptKDError(f"{path}: not a readable checkpoint ({msg[:200]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # open_clip / Dassl training checkpoint
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PromptKDError(f"{path}: expected a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    openai = torchscript or "input_resolution" in sd  # OpenAI archives carry these buffers
    for k in _OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    return sd, bool(openai)


def load_weights_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names what differs (never a silent strict=False)."""
    own = model.state_dict()
    # Non-persistent buffers (the text causal mask) appear in TorchScript state dicts: ignore them.
    transient = {n for n, _ in model.named_buffers()} - set(own)
    sd = {k: v for k, v in sd.items() if k not in transient}
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or shape:
        parts = []
        if shape:
            parts.append(f"{len(shape)} shape mismatches (first: {shape[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (first: {extra[0]})")
        raise PromptKDError(f"{source}: checkpoint does not fit this architecture: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


def load_clip(model: str, pretrained: str | None = None, *, device: str | torch.device = "cpu") -> ClipBundle:
    """Build a CLIP and load its weights.

    model: an open_clip model name (`ViT-B-16`), a path to a model-config JSON (tiny test
      architectures), or a shipped toy model (`toy-teacher`, `toy-student`).
    pretrained: an open_clip weights tag (`openai`, `laion2b_s34b_b88k`, ...), a local checkpoint
      path, or None for random initialisation.
    """
    import open_clip

    if model.startswith("toy-"):
        from promptkd.toy.models import build_toy_clip  # refuses an unknown toy name

        clip, preprocess_cfg, tokenizer = build_toy_clip(model, pretrained=pretrained != "none")
        return ClipBundle(clip.to(device).eval(), model, "toy" if pretrained != "none" else None, tokenizer, preprocess_cfg)

    name = model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise PromptKDError(f"{path}: model config not found")
        name = _register_json_config(path)
    elif model not in open_clip.list_models():
        raise PromptKDError(f"unknown model {model!r}: not an open_clip model name (see `open_clip.list_models()`) nor a .json config")

    local = pretrained is not None and (Path(pretrained).exists() or any(c in pretrained for c in "/\\."))
    try:
        if pretrained is None or local:
            sd, openai = read_state_dict(pretrained) if local else ({}, False)
            with quiet_open_clip():
                clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=openai)
            if local:
                load_weights_into(clip, sd, str(pretrained))
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise PromptKDError(
                    f"unknown weights tag {pretrained!r} for {name}; known tags: {', '.join(tags) or 'none'} "
                    "(or give a local checkpoint path)"
                )
            clip = open_clip.create_model(name, pretrained=pretrained)
    except PromptKDError:
        raise
    except RuntimeError as e:
        raise PromptKDError(f"{pretrained or name}: could not build the model ({str(e).splitlines()[0][:200]})") from None
    visual = clip.visual
    preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(clip.to(device).eval(), name, pretrained, tokenizer, preprocess_cfg)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze every parameter (the CLIP towers are never trained here)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
