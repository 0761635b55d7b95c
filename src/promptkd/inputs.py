"""How a command names and finds its inputs: a teacher or student given as an artifact file or as
the run folder that holds it, the class vectors and dataset a run folder remembers, and the CLIP
an artifact was built on (rebuilt from the files it recorded, or from explicit --ROLE-model /
--ROLE-weights, which override them).

Kinds are checked from artifact headers only (no torch), so a wrong input is reported before any
model or dataset is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from promptkd.artifacts import (  # noqa: F401  (the run-folder names live beside the artifact files)
    ARTIFACT_FILES,
    CLASS_VECTORS_FILE,
    artifact_path,
    class_vectors_path,
    read_artifact_meta,
    student_class_vectors,
)
from promptkd.errors import PromptKDError
from promptkd.runs import read_run_record
from promptkd.settings import random_weights


def artifact_kind(given: str | Path, option: str) -> tuple[str, Path]:
    """(teacher | student, artifact file) of a file or run folder whose kind is not known yet."""
    path = Path(given)
    if path.is_dir():
        for kind, name in ARTIFACT_FILES.items():
            if (path / name).is_file():
                return kind, artifact_path(path, kind, option)
        raise PromptKDError(f"{option} {path}: a folder without teacher.safetensors or student.safetensors")
    if not path.is_file():
        raise PromptKDError(f"{option} {path}: file or run folder not found")
    kind = read_artifact_meta(path).get("kind")
    if kind not in ARTIFACT_FILES:
        raise PromptKDError(f"{option} {path}: expected a teacher or student artifact, found kind={kind!r}")
    return kind, path


def run_record_of(artifact: Path) -> dict:
    """The run.json of the folder an artifact sits in ({} outside a run folder)."""
    return read_run_record(Path(artifact).parent) or {}


def one_of(positional, option_value, option: str) -> str | None:
    """A command's subject given either as its positional argument or as `option`, not both."""
    if positional and option_value and Path(positional) != Path(option_value):
        raise PromptKDError(f"give the {option.lstrip('-')} once: as the first argument or with {option}")
    return positional or option_value


def dataset_inputs(dataset: str | None, root) -> tuple[dict, dict]:
    """(inputs, roots) of a dataset for runs.check_apart: the folder or split file a `folder:`,
    `images:` or `split:` dataset is read from, and the data root, which an output may lie inside (a
    benchmark's root holds many datasets; a split file's images lie under it)."""
    prefix, _, rest = (dataset or "").partition(":")
    if prefix not in ("folder", "images", "split") or not rest:
        return {}, ({"data root": root} if root else {})
    path = Path(os.path.expanduser(rest))
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if prefix == "split":
        return {"split file": path}, {"image root": root or path.parent}
    return {"image folder": path}, {}


def clip_inputs(model: str | None, weights: str | None, role: str) -> dict:
    """A CLIP's local files (config JSON, weights), as inputs for runs.check_apart."""
    return {f"{role} CLIP {what}": given for what, given in (("config", model), ("weights", weights))
            if given and os.path.exists(given)}


def check_clip_files(model: str | None, weights: str | None, role: str) -> None:
    """A CLIP named by files (config JSON, local weights) must have them, before any heavy work."""
    if model and model.endswith(".json") and not Path(model).is_file():
        raise PromptKDError(f"--{role}-model {model}: model config not found")
    if not random_weights(weights) and any(c in weights for c in "/\\.") \
            and not Path(weights).exists():
        raise PromptKDError(f"--{role}-weights {weights}: weights file not found")
    if weights and Path(weights).is_dir():
        raise PromptKDError(f"--{role}-weights {weights} is a folder; give the weights file")


def artifact_clip(path, kind: str, clip_model: str | None, clip_weights: str | None, device):
    """The artifact's CLIP when --ROLE-model / --ROLE-weights override what it recorded (None: the
    artifact's loader rebuilds the recorded one)."""
    from promptkd.models.loading import clip_from_source, load_clip

    if clip_model is None and clip_weights is None:
        return None
    meta = read_artifact_meta(path, kind)
    source = meta.get("clip_source")
    if isinstance(source, dict) and source:
        return clip_from_source(source, where=str(path), role=kind, device=device, model=clip_model,
                                weights=clip_weights)
    ident = meta.get("clip") if isinstance(meta.get("clip"), dict) else {}  # artifacts without clip_source
    return load_clip(clip_model or ident.get("model", "?"),
                     clip_weights if clip_weights is not None else ident.get("pretrained"), device=device)


def add_clip_args(p, role: str) -> None:
    """--ROLE-model / --ROLE-weights for an artifact's CLIP (needed only when its recorded files moved)."""
    from promptkd.options import add_model_options

    add_model_options(p, role, default_note="default: what the artifact recorded")


def load_teacher(path, clip_model: str | None = None, clip_weights: str | None = None, device="cpu"):
    """A teacher artifact (file or run folder) on the CLIP it recorded, or on the one given."""
    from promptkd.models.wrappers import Teacher

    path = artifact_path(path, "teacher")
    return Teacher.load(path, clip=artifact_clip(path, "teacher", clip_model, clip_weights, device), device=device)


def load_student(path, clip_model: str | None = None, clip_weights: str | None = None, device="cpu"):
    """A student artifact (file or run folder) on the CLIP it recorded, or on the one given."""
    from promptkd.models.wrappers import Student

    path = artifact_path(path, "student")
    return Student.load(path, clip=artifact_clip(path, "student", clip_model, clip_weights, device), device=device)
