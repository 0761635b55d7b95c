"""Load any open_clip CLIP: by name + weights tag, from a local checkpoint, or from a tiny JSON config.

Local checkpoints may be OpenAI's original TorchScript archives (`ViT-L-14.pt`, what the official
repo reads), plain state dicts, open_clip training checkpoints or safetensors. None of them is
ever unpickled with arbitrary code: torch.load runs with weights_only=True, TorchScript archives
are read by an allow-list unpickler that never compiles or runs their code (models/torchscript.py;
torch.jit.load would run it), safetensors has no code at all.

A bundle remembers where it came from (`source`: the model name or config file and the weights
tag or file, files by absolute path and sha256, and the seed of a random initialisation), so an
artifact built on it can rebuild exactly the same CLIP later (`clip_from_source`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptkd.artifacts import check_finite
from promptkd.errors import PromptKDError
from promptkd.files import check_file_record, file_digest, file_record, is_file_record
from promptkd.logs import quiet_open_clip
from promptkd.models.sources import random_weights, source_loader
from promptkd.models.torchscript import read_torchscript_state_dict

log = logging.getLogger(__name__)

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
    source: dict = field(default_factory=dict)  # what rebuilds it (with init_seed for random weights)

    def identity(self) -> dict:
        """Which CLIP this is, for matching a teacher and its outputs (`same_clip`): the model name, the
        weights tag or file name, the sha256 of a weights file, and the seed of random weights.
        Nothing in it depends on where the weights file lies."""
        pre = self.pretrained
        if pre and Path(pre).exists():
            pre = Path(pre).name
        ident = {"model": self.name, "pretrained": pre}
        weights = self.source.get("weights")
        if is_file_record(weights):
            ident["sha256"] = weights["sha256"]
        if pre is None and self.source.get("init_seed") is not None:
            ident["init_seed"] = self.source["init_seed"]
        return ident

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)


def same_clip(a: dict, b: dict) -> bool:
    """Two CLIP identities name the same CLIP: the same model and the same weights (by sha256 when
    both record it, so a renamed or moved weights file is still the same CLIP; else by tag or file
    name), and the same seed for random weights."""
    if not isinstance(a, dict) or not isinstance(b, dict) or a.get("model") != b.get("model"):
        return False
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    if (a.get("pretrained") or None) != (b.get("pretrained") or None):
        return False
    return a.get("init_seed") is None or b.get("init_seed") is None or a["init_seed"] == b["init_seed"]


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


def _block_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def clip_geometry(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """The architecture numbers a CLIP state dict determines (OpenAI / open_clip key names), by name.

    Head counts are not among them: no tensor's shape depends on the number of heads.
    """
    def shape(key):
        return tuple(sd[key].shape) if key in sd else ()

    g: dict[str, int] = {}
    conv = shape("visual.conv1.weight")
    if len(conv) == 4:
        g["vision width"], g["patch size"] = conv[0], conv[-1]
        pos = shape("visual.positional_embedding")
        grid = math.isqrt(pos[0] - 1) if pos and pos[0] > 1 else 0
        if grid and grid * grid == pos[0] - 1:
            g["image size"] = grid * conv[-1]
    for tower, prefix in (("vision", "visual."), ("text", "")):
        if n := _block_count(sd, f"{prefix}transformer.resblocks."):
            g[f"{tower} layers"] = n
        if fc := shape(f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"):
            g[f"{tower} mlp width"] = fc[0]
    if len(proj := shape("visual.proj")) == 2:
        g["embed dim"] = proj[1]
    if len(emb := shape("token_embedding.weight")) == 2:
        g["vocab size"], g["text width"] = emb
    if pos := shape("positional_embedding"):
        g["context length"] = pos[0]
    return g


def check_geometry(model: nn.Module, sd: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Refuse weights whose widths, layer counts, patch/image size or vocabulary differ from the
    architecture's, naming each difference (before any tensor is copied)."""
    want, got = clip_geometry(model.state_dict()), clip_geometry(sd)
    diff = [f"{k} {got[k]} in the checkpoint, {want[k]} in {name}" for k in got if k in want and got[k] != want[k]]
    if diff:
        raise PromptKDError(f"{source}: checkpoint does not fit {name}: {'; '.join(diff)}")


def openai_head_overrides(cfg: dict, sd: dict[str, torch.Tensor], source: str, name: str) -> dict:
    """open_clip config overrides that give OpenAI-format weights OpenAI's head counts.

    OpenAI's `build_model` sets heads = width // 64 in both towers; state dicts carry no head
    count. A config that does not set them gets it here (open_clip's default of 8 text heads would
    run silently with wrong features); a config that sets other heads is refused. Widths under 64
    have no OpenAI rule: the config must set them.
    """
    g = clip_geometry(sd)
    out = {}
    text, vision = dict(cfg.get("text_cfg") or {}), dict(cfg.get("vision_cfg") or {})
    if width := g.get("text width"):
        rule = width // 64
        if "heads" not in text:
            if not rule:
                raise PromptKDError(f"{source}: cannot infer the text heads of width {width} (OpenAI's rule is "
                                    f"width // 64); set text_cfg.heads in {name}'s config")
            text["heads"] = rule
            out["text_cfg"] = text
        elif rule and text["heads"] != rule:
            raise PromptKDError(f"{source}: OpenAI-format weights have text heads = width // 64 = {rule}, "
                                f"but {name} sets {text['heads']}")
    if (width := g.get("vision width")) and isinstance(vision.get("layers", 12), int):
        rule = width // 64
        if "head_width" not in vision:
            if not rule:
                raise PromptKDError(f"{source}: cannot infer the vision heads of width {width} (OpenAI's rule is "
                                    f"width // 64); set vision_cfg.head_width in {name}'s config")
            vision["head_width"] = width // rule
            out["vision_cfg"] = vision
        elif rule and width // vision["head_width"] != rule:
            raise PromptKDError(f"{source}: OpenAI-format weights have vision heads = width // 64 = {rule}, "
                                f"but {name} gives {width // vision['head_width']} (head_width {vision['head_width']})")
    return out


def load_weights_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names what differs (never a silent strict=False).

    NaN or infinite weights are refused too, naming the tensor.
    """
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
    check_finite(sd, source)
    model.load_state_dict(sd, strict=True)


@contextlib.contextmanager
def seeded_init(init_seed: int):
    """Random initialisation from `init_seed` alone, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        yield


def warn_random_weights(name: str, init_seed: int) -> None:
    log.warning("%s has random weights (seed %d): fine for testing the pipeline, meaningless for accuracy",
                name, init_seed)


def load_clip(model: str, pretrained: str | None = None, *, device: str | torch.device = "cpu",
              init_seed: int = 0) -> ClipBundle:
    """Build a CLIP and load its weights.

    model: an open_clip model name (`ViT-B-16`), a path to a model-config JSON (tiny test
      architectures), or a name a registered model source claims (models/sources.py: the shipped toy
      models `toy-teacher`, `toy-student`).
    pretrained: an open_clip weights tag (`openai`, `laion2b_s34b_b88k`, ...), a local checkpoint
      path, or None / 'none' for a random initialisation drawn from `init_seed` (so the same tower
      can be rebuilt later; a warning says the weights are random). The toy models take 'toy'
      (their shipped weights, also what None gives them), 'none' or a toy weights file.
    """
    import open_clip

    from promptkd.models.downloads import check_downloadable

    if (loader := source_loader(model)) is not None:  # e.g. the toy world's CLIPs (models/sources.py)
        return loader(model, pretrained, device=device, init_seed=init_seed)

    name, model_source = model, model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise PromptKDError(f"{path}: model config not found")
        name = _register_json_config(path)
        model_source = file_record(path)
    elif model not in open_clip.list_models():
        raise PromptKDError(f"unknown model {model!r}: not an open_clip model name (see `open_clip.list_models()`) nor a .json config")

    random = random_weights(pretrained)
    pretrained = None if random else pretrained
    local = pretrained is not None and (Path(pretrained).exists() or any(c in pretrained for c in "/\\."))
    source = {"model": model_source, "weights": "none" if random else pretrained}
    try:
        if random or local:
            sd, openai = read_state_dict(pretrained) if local else ({}, False)
            overrides = openai_head_overrides(open_clip.get_model_config(name), sd, str(pretrained), name) \
                if openai else {}
            with quiet_open_clip(), seeded_init(init_seed):
                clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=openai, **overrides)
            if local:
                check_geometry(clip, sd, str(pretrained), name)
                load_weights_into(clip, sd, str(pretrained))
                source["weights"] = file_record(pretrained)
            else:
                source["init_seed"] = init_seed
                warn_random_weights(name, init_seed)
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise PromptKDError(
                    f"unknown weights tag {pretrained!r} for {name}; known tags: {', '.join(tags) or 'none'} "
                    "(or give a local checkpoint path)"
                )
            check_downloadable(name, pretrained)  # offline: one line within seconds, not a minute of retries
            try:
                clip = open_clip.create_model(name, pretrained=pretrained)
            except (OSError, ValueError) as e:  # a download that failed midway: its last line, whole
                last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                raise PromptKDError(f"weights tag {pretrained!r} of {name}: download failed ({last}); pass a "
                                    "local weights file instead of the tag") from None
    except PromptKDError:
        raise
    except RuntimeError as e:
        raise PromptKDError(f"{pretrained or name}: could not build the model ({str(e).splitlines()[0][:200]})") from None
    visual = clip.visual
    preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(clip.to(device).eval(), name, pretrained, tokenizer, preprocess_cfg, source)


def clip_from_source(source: dict, *, where: str, role: str, device: str | torch.device = "cpu",
                     model: str | None = None, weights: str | None = None) -> ClipBundle:
    """Rebuild the CLIP an artifact recorded (`ClipBundle.source`); `model` / `weights` override the
    recorded ones. A recorded file that moved or changed is one line naming its path and sha256."""
    def recorded(value, what, option):
        if is_file_record(value):
            return str(check_file_record(value, f"{where}: its {role} CLIP {what}",
                                         f"pass the file it was made with as {option} PATH"))
        if not isinstance(value, str):
            raise PromptKDError(f"{where}: metadata clip_source.{what} is malformed ({str(value)[:80]})")
        return value

    init_seed = source.get("init_seed", 0)
    if type(init_seed) is not int:
        raise PromptKDError(f"{where}: metadata clip_source.init_seed must be an integer, got {init_seed!r}")
    if model is None:
        model = recorded(source.get("model"), "config", f"--{role}-model")
    if weights is None:
        weights = recorded(source.get("weights"), "weights", f"--{role}-weights")
    elif is_file_record(source.get("weights")) and Path(weights).is_file():
        want = source["weights"]
        if file_digest(weights) != want["sha256"]:
            raise PromptKDError(f"{weights}: not the {role} CLIP weights {where} was made with ({want['path']}, "
                                f"sha256 {want['sha256']})")
    return load_clip(model, weights, device=device, init_seed=init_seed)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze every parameter (the CLIP towers are never trained here)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ImageTowerCLIP(nn.Module):
    """A CLIP reduced to what a deployed student runs: its image tower and its logit scale."""

    def __init__(self, visual: nn.Module, logit_scale: torch.Tensor):
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().float(), requires_grad=False)


def vision_tower_config(bundle: ClipBundle) -> dict:
    """What rebuilds this CLIP's image tower with no weights file and no registered config: open_clip's
    vision config with the head width and activation the tower really has, and its output dim."""
    import open_clip

    cfg = open_clip.get_model_config(bundle.name)
    visual = bundle.model.visual
    if cfg is None or not hasattr(visual, "conv1"):
        raise PromptKDError(f"{bundle.name}: cannot describe its image tower (not an open_clip ViT with a known config)")
    vision = dict(cfg["vision_cfg"])
    vision["head_width"] = visual.conv1.out_channels // visual.transformer.resblocks[0].attn.num_heads
    quick = any(type(m).__name__ == "QuickGELU" for m in visual.modules())
    return {"embed_dim": int(visual.output_dim), "vision_cfg": vision, "quick_gelu": quick}


def build_vision_tower(tower: Any, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """An open_clip ViT image tower from `vision_tower_config`'s description, filled with `tensors`
    (its state dict). The description is checked against the tensors before anything is built, so a
    crafted file cannot ask for a huge model; the load itself is strict."""
    from open_clip.model import _build_vision_tower  # open_clip's own builder, the one create_model uses

    vision = tower.get("vision_cfg") if isinstance(tower, dict) else None
    embed = tower.get("embed_dim") if isinstance(tower, dict) else None
    if not isinstance(vision, dict) or type(embed) is not int or not isinstance(tower.get("quick_gelu"), bool):
        raise PromptKDError(f"{source}: image tower description is missing or malformed")
    if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        raise PromptKDError(f"{source}: only open_clip ViT image towers can be deployed in one file")
    width, size = vision.get("width", 768), vision.get("image_size", 224)
    size = size[0] if isinstance(size, list) and size else size
    want = {"vision width": width, "patch size": vision.get("patch_size", 16), "vision layers": vision["layers"],
            "image size": size, "embed dim": embed, "vision mlp width": int(width * vision.get("mlp_ratio", 4.0))}
    got = clip_geometry({f"visual.{k}": v for k, v in tensors.items()})
    diff = [f"{k} {want[k]} in the description, {got.get(k)} in the tensors" for k in want if got.get(k) != want[k]]
    if diff:
        raise PromptKDError(f"{source}: image tower description does not fit its tensors: {'; '.join(diff)}")
    try:
        with quiet_open_clip():
            visual = _build_vision_tower(embed, vision, quick_gelu=tower["quick_gelu"])
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise PromptKDError(f"{source}: cannot build its image tower ({str(e).splitlines()[0][:200]})") from None
    load_weights_into(visual, tensors, source)
    return visual.eval()
