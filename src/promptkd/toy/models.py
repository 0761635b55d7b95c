"""The two tiny CLIPs of the toy world: standard open_clip models built from shipped files.

``toy-teacher`` and ``toy-student`` are ordinary open_clip ``CLIP`` models (ViT image
tower with a CLS token, standard causal text tower, open_clip's ``SimpleTokenizer``
with a 24-token context). Their architectures are open_clip model-config JSON files in
``promptkd/assets/toy/``, registered with ``open_clip.add_model_config``; their weights
are safetensors files next to them.

To keep the files small, the 49,408-row token embedding is stored *trimmed*: only the
rows of the token ids the world's captions and prompts use (``token_embedding.rows``)
plus those ids (``token_embedding.ids``). Loading puts them back into a full-size
embedding whose other rows are zero, so any text made of world words (every caption,
every class name, the CLIP templates, PromptSRC's templates) gives exactly the features
of the untrimmed model; words outside the world were never trained anyway.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file, save

from promptkd.artifacts import atomic_open
from promptkd.errors import PromptKDError
from promptkd.files import file_record
from promptkd.models.loading import ClipBundle, seeded_init, warn_random_weights
from promptkd.models.sources import random_weights
from promptkd.toy import TOY_MODELS
from promptkd.toy.world import IMAGE_SIZE, vocabulary_words

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
WEIGHTS_FORMAT = "promptkd-toy-clip/1"

PREPROCESS_CFG = {
    "size": IMAGE_SIZE,
    "mode": "RGB",
    "mean": tuple(OPENAI_DATASET_MEAN),
    "std": tuple(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
    # Training crops: at 48 px the official (0.08, 1) scale often crops the shape away.
    "crop_scale": (0.5, 1.0),
}

_TOKEN_ROWS = "token_embedding.rows"
_TOKEN_IDS = "token_embedding.ids"


def toy_model_names() -> list[str]:
    return list(TOY_MODELS)


def _check_name(name: str) -> str:
    if name not in toy_model_names():
        raise PromptKDError(f"unknown toy model {name!r}; choose one of {toy_model_names()}")
    return name


@lru_cache(maxsize=1)
def register_toy_configs() -> None:
    """Make ``toy-teacher`` / ``toy-student`` known to ``open_clip.create_model``."""
    for name in toy_model_names():
        open_clip.add_model_config(ASSET_DIR / f"{name}.json")


def toy_model_config(name: str) -> dict:
    return json.loads((ASSET_DIR / f"{_check_name(name)}.json").read_text())


def toy_weights_path(name: str) -> Path:
    return ASSET_DIR / f"{_check_name(name)}.safetensors"


@lru_cache(maxsize=1)
def world_token_ids() -> tuple[int, ...]:
    """Sorted ids of every BPE token the world's texts can produce (plus start/end)."""
    tok = open_clip.SimpleTokenizer()
    ids = {tok.sot_token_id, tok.eot_token_id}
    for phrase in vocabulary_words():
        ids.update(tok.encode(phrase))
    return tuple(sorted(ids))


def create_toy_model(name: str) -> torch.nn.Module:
    """A randomly initialised standard open_clip model of the toy architecture."""
    register_toy_configs()
    from promptkd.logs import quiet_open_clip

    with quiet_open_clip():
        return open_clip.create_model(_check_name(name), pretrained=None, force_preprocess_cfg=PREPROCESS_CFG)


def trimmed_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with the token embedding cut down to the world's rows."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    ids = torch.tensor(world_token_ids(), dtype=torch.int64)
    state[_TOKEN_ROWS] = table[ids].clone()
    state[_TOKEN_IDS] = ids
    return state


def save_toy_weights(model: torch.nn.Module, path: str | Path, name: str, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": WEIGHTS_FORMAT, "model": _check_name(name), "config": json.dumps(toy_model_config(name))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    blob = save(trimmed_state_dict(model), metadata=meta)
    with atomic_open(path, "wb") as f:  # temporary file, fsync, rename: a crash keeps the old weights
        f.write(blob)
    path.chmod(0o644)  # package data, readable by everyone
    return path


def read_toy_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_toy_weights(model: torch.nn.Module, path: str | Path, name: str) -> None:
    """Fill ``model`` from a trimmed toy weights file; any mismatch is an error."""
    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"toy weights not found: {path} (run `promptkd toy pretrain {name}` to make them)")
    meta = read_toy_metadata(path)
    if meta.get("format") != WEIGHTS_FORMAT or meta.get("model") != name:
        raise PromptKDError(
            f"{path} holds format={meta.get('format')!r} model={meta.get('model')!r}, "
            f"expected format={WEIGHTS_FORMAT!r} model={name!r}"
        )
    tensors = load_file(str(path))
    ids, rows = tensors.pop(_TOKEN_IDS), tensors.pop(_TOKEN_ROWS)
    expected = model.state_dict()
    table = torch.zeros_like(expected["token_embedding.weight"])
    if ids.max() >= table.shape[0] or rows.shape[1] != table.shape[1]:
        raise PromptKDError(f"{path}: token rows {tuple(rows.shape)} do not fit embedding {tuple(table.shape)}")
    table[ids] = rows.to(table.dtype)
    tensors["token_embedding.weight"] = table
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise PromptKDError(
            f"{path} does not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    model.load_state_dict(tensors, strict=True)


def build_toy_clip(name: str, pretrained: bool = True, weights: str | Path | None = None):
    """``(open_clip CLIP in eval mode, preprocess_cfg dict, tokenizer)`` for a toy model.

    ``pretrained=False`` gives a random initialisation (for tests); ``weights`` loads a
    file other than the shipped one (e.g. a pretraining checkpoint).
    """
    model = create_toy_model(name)
    if pretrained or weights is not None:
        load_toy_weights(model, weights if weights is not None else toy_weights_path(name), name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return model, dict(PREPROCESS_CFG), tokenizer


def load_toy_clip(model: str, pretrained: str | None, *, device: str | torch.device = "cpu",
                  init_seed: int = 0) -> ClipBundle:
    """The toy world's model source for `load_clip` (registered in promptkd/__init__.py): a shipped
    toy CLIP as a ClipBundle, with its shipped weights ('toy', or None in the Python API), a toy
    weights file (e.g. from `promptkd toy pretrain`), or 'none' for a seeded random initialisation."""
    if model not in toy_model_names():
        raise PromptKDError(f"unknown toy model {model!r}; choose one of {toy_model_names()}")
    if pretrained is not None and random_weights(pretrained):
        with seeded_init(init_seed):
            clip, preprocess_cfg, tokenizer = build_toy_clip(model, pretrained=False)
        warn_random_weights(model, init_seed)
        return ClipBundle(clip.to(device).eval(), model, None, tokenizer, preprocess_cfg,
                          {"model": model, "weights": "none", "init_seed": init_seed})
    if pretrained in (None, "toy"):
        clip, preprocess_cfg, tokenizer = build_toy_clip(model)
        return ClipBundle(clip.to(device).eval(), model, "toy", tokenizer, preprocess_cfg,
                          {"model": model, "weights": "toy"})
    if not Path(pretrained).is_file():
        raise PromptKDError(f"{model}: no weights {pretrained!r}: a toy model takes 'toy' (its shipped weights), "
                            "'none' (random) or a toy weights file from `promptkd toy pretrain`")
    clip, preprocess_cfg, tokenizer = build_toy_clip(model, weights=pretrained)
    return ClipBundle(clip.to(device).eval(), model, str(pretrained), tokenizer, preprocess_cfg,
                      {"model": model, "weights": file_record(pretrained)})


def image_tower_macs(name: str) -> int:
    """Multiply-accumulates of one image through the image tower (matmuls only)."""
    v = toy_model_config(name)["vision_cfg"]
    width, layers, patch, size = v["width"], v["layers"], v["patch_size"], v["image_size"]
    hidden = int(width * v.get("mlp_ratio", 4.0))
    n_patches = (size // patch) ** 2
    tokens = n_patches + 1
    embed = n_patches * 3 * patch * patch * width
    per_layer = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
    proj = width * toy_model_config(name)["embed_dim"]
    return embed + layers * per_layer + proj
