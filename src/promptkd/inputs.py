"""How a command names and finds its inputs: the CLIP options of an artifact's role, and loading a
teacher or student artifact with the CLIP it was built on."""

from __future__ import annotations

from pathlib import Path

from promptkd.errors import PromptKDError


def artifact_clip(path, kind: str, clip_model: str | None, clip_weights: str | None, device):
    """The artifact's CLIP, rebuilt from explicit model/weights when given; a missing file is one line."""
    from promptkd.artifacts import read_artifact_meta
    from promptkd.models import load_clip

    if not Path(path).is_file():
        raise PromptKDError(f"{kind} artifact not found: {path}")
    if clip_model is None and clip_weights is None:
        return None
    meta = read_artifact_meta(path, kind=kind)
    ident = meta.get("clip") or {}
    return load_clip(clip_model or ident.get("model", "?"),
                     clip_weights if clip_weights is not None else ident.get("pretrained"), device=device)


def add_clip_args(p, role: str, model_flag: str | None = None) -> None:
    """The two options that name an artifact's CLIP when its file cannot (local weights), as
    `load_teacher` / `load_student` take them."""
    p.add_argument(model_flag or f"--{role}-clip-model", metavar="MODEL",
                   help=f"the {role}'s CLIP model name or config JSON (default: from the file)")
    p.add_argument(f"--{role}-clip", metavar="TAG|PATH", help=f"the {role}'s CLIP weights, if a local file")


def load_teacher(path, clip_model: str | None = None, clip_weights: str | None = None, device="cpu"):
    """A teacher artifact; `clip_model`/`clip_weights` supply its CLIP when the name alone cannot."""
    from promptkd.models.wrappers import Teacher

    return Teacher.load(path, clip=artifact_clip(path, "teacher", clip_model, clip_weights, device), device=device)


def load_student(path, clip_model: str | None = None, clip_weights: str | None = None, device="cpu"):
    from promptkd.models.wrappers import Student

    return Student.load(path, clip=artifact_clip(path, "student", clip_model, clip_weights, device), device=device)
