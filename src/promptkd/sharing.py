"""Students people can share: a Hub-style model folder with a model card, and one loader for every
kind of student a command takes (`promptkd.load`).

The folder (`promptkd export RUN --format folder --out DIR`) follows the conventions of models on
the Hugging Face Hub, so it can be uploaded as it is and loaded back with `promptkd.load("hf-hub:ORG/NAME")`:

    config.json                what the folder holds (format, files, preprocessing, student, teacher)
    model.safetensors          the one-file student (image tower, prompts, projector, class vectors)
    classes.txt                the class names, one per line, in logit order
    class_vectors.safetensors  the same class vectors as a class-vector file (pairs with new ones)
    README.md                  the model card: YAML front matter (library, pipeline tag, base models,
                               dataset, metrics of the run) and what it is, how to load it, its teacher,
                               the licence of the base CLIP weights and the command that made it

No torch at import: `import promptkd` stays cheap; the loaders import it when they run.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from promptkd.errors import PromptKDError, raise_if_interrupted

FOLDER_FORMAT = "promptkd-model/1"
CONFIG_FILE, WEIGHTS_FILE, CLASSES_FILE = "config.json", "model.safetensors", "classes.txt"
CLASS_VECTORS_FILE, CARD_FILE = "class_vectors.safetensors", "README.md"
FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CLASSES_FILE, CLASS_VECTORS_FILE, CARD_FILE)
HUB_PREFIX = "hf-hub:"
LIBRARY_NAME = "promptkd"
# The folder classifies its own class list; new classes need the teacher's text tower (not in the
# folder) to make their vectors, so it is an image classifier, not a zero-shot one by itself.
PIPELINE_TAG = "image-classification"
SCORE_ORDER = ("base", "novel", "hm", "accuracy")


# ---------------------------------------------------------------------------------------------
# Loading


def load(model: str | os.PathLike, *, class_vectors: str | os.PathLike | None = None, device: str = "cpu",
         allow_other_teacher: bool = False, revision: str | None = None):
    """A classifier from anything the command line takes as a student:

    - a model folder (`promptkd export --format folder`), or `hf-hub:ORG/NAME` for one on the Hub
      (needs huggingface_hub; `revision` picks a branch, tag or commit);
    - a student run folder or `student.safetensors` (its class vectors: those beside it, or `class_vectors`);
    - a one-file student (`--format safetensors`) or an ONNX export (`--format onnx`, or
      `--format image-features` with its class vectors beside it or given).

    It has `predict(images, topk=5)`, `classes`, `preprocess(images)` and `image_features(images)`
    (L2-normalised, in the teacher's class-vector space). `class_vectors` replaces the model's own
    (open vocabulary; refused when another teacher made them, unless `allow_other_teacher`).
    """
    from promptkd.deploy import OnnxClassifier, StudentClassifier, load_model

    given = os.fspath(model)
    path = hub_snapshot(given[len(HUB_PREFIX):], revision) if given.startswith(HUB_PREFIX) else Path(given)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        clf = load_folder(path, device=device)
    elif path.is_dir() or (path.is_file() and path.suffix != ".onnx" and _artifact_kind(path) == "student"):
        from promptkd.inputs import artifact_path, student_class_vectors

        student = artifact_path(path, "student", "promptkd.load:")
        cv = student_class_vectors(student, class_vectors)
        return StudentClassifier.load(student, cv, device=device, allow_other_teacher=allow_other_teacher)
    elif path.suffix == ".onnx":
        return OnnxClassifier(path, class_vectors=class_vectors, allow_other_teacher=allow_other_teacher)
    else:
        clf = load_model(path, device=device)
    if class_vectors is not None:
        clf = clf.with_class_vectors(class_vectors, allow_other_teacher=allow_other_teacher)
    return clf


def _artifact_kind(path: Path) -> str | None:
    from promptkd.artifacts import read_artifact_meta

    try:
        return read_artifact_meta(path).get("kind")
    except PromptKDError:
        return None


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local copy of a model folder on the Hugging Face Hub (downloaded once, then cached by
    huggingface_hub; HF_HUB_OFFLINE=1 uses the cache only)."""
    if not repo_id or repo_id.count("/") != 1:
        raise PromptKDError(f"{HUB_PREFIX}{repo_id}: expected {HUB_PREFIX}ORG/NAME")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PromptKDError("loading from the Hub needs huggingface_hub (pip install 'promptkd[hub]')") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(FOLDER_FILES)))
    except Exception as e:  # network, missing repo, gated access: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PromptKDError(f"{HUB_PREFIX}{repo_id}: could not get the model folder ({first[:200]})") from None


def read_folder_config(folder: str | os.PathLike) -> dict:
    """A model folder's config.json, checked for the fields a loader reads (no torch)."""
    from promptkd.artifacts import read_json

    folder = Path(folder)
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise PromptKDError(f"{folder / CONFIG_FILE}: not a promptkd model folder (format "
                            f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FOLDER_FORMAT})")
    weights = config.get("weights")
    if not isinstance(weights, str) or Path(weights).name != weights:
        raise PromptKDError(f"{folder / CONFIG_FILE}: 'weights' must name a file in the folder, got {weights!r}")
    return config


def load_folder(folder: str | os.PathLike, device: str = "cpu"):
    """The classifier of a model folder: its one-file student, whose classes must be classes.txt."""
    from promptkd.deploy import StudentClassifier

    folder = Path(folder)
    config = read_folder_config(folder)
    clf = StudentClassifier.load(folder / config["weights"], device=device)
    classes_file = folder / str(config.get("classes") or CLASSES_FILE)
    if classes_file.is_file() and read_classes(classes_file) != clf.classnames:
        raise PromptKDError(f"{classes_file}: the class list differs from {folder / config['weights']}'s")
    return clf


def read_classes(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Writing (the weights file itself is written and checked by `promptkd export`)


def write_folder_files(folder: Path, meta: dict, *, metrics: dict | None,
                       made_by: str | None, trained_by: str | None, selected_on: str | None = None) -> None:
    """config.json, classes.txt and README.md beside the folder's model.safetensors (whose metadata
    is `meta`: the one-file student's) and class_vectors.safetensors."""
    from promptkd import __version__
    from promptkd.artifacts import atomic_open, write_json

    config = {
        "format": FOLDER_FORMAT, "library_name": LIBRARY_NAME, "promptkd_version": __version__,
        "weights": WEIGHTS_FILE, "classes": CLASSES_FILE, "class_vectors": CLASS_VECTORS_FILE,
        "num_classes": len(meta["classnames"]), "precision": meta.get("precision", "fp32"),
        **{k: meta.get(k) for k in ("image_size", "mean", "std", "interpolation", "resize_mode", "logit_scale")},
        "student": {k: v for k, v in (meta.get("student") or {}).items() if k != "tower"},
        "teacher": meta.get("teacher"), "class_vectors_teacher": meta.get("class_vectors_teacher"),
        "dataset": (metrics or {}).get("dataset"), "protocol": (metrics or {}).get("protocol"),
        "selected_on": selected_on, "exported_with": made_by, "trained_with": trained_by,
    }
    config["metrics"] = dict(score_rows(metrics, "val" if selected_on == "val" else "last"))
    with atomic_open(folder / CLASSES_FILE, "w") as f:
        f.write("".join(f"{c}\n" for c in meta["classnames"]))
    with atomic_open(folder / CARD_FILE, "w") as f:
        f.write(model_card(config, metrics))
    write_json(folder / CONFIG_FILE, config)  # last: a folder with config.json is a finished export


def score_rows(metrics: dict | None, selected_on: str = "last") -> list[tuple[str, dict]]:
    """(label, scores) rows of a distillation's metrics.json: the student's zero-shot and the
    teacher's (baseline), then this student's (the epoch it was exported from)."""
    if not isinstance(metrics, dict):
        return []
    rows = []
    base = metrics.get("baseline") or {}
    for key, label in (("student_zero_shot", "student CLIP, zero-shot"), ("teacher", "teacher (class vectors)")):
        if isinstance(base.get(key), dict):
            rows.append((label, _scores(base[key])))
    results = metrics.get("results") or {}
    mine = results.get("best_val" if selected_on == "val" else "last")
    if isinstance(mine, dict):
        rows.append((f"this student (distilled, {'best validation' if selected_on == 'val' else 'last'} epoch)",
                     _scores(mine)))
    return [(label, s) for label, s in rows if s]


def _scores(d: dict) -> dict:
    keys = [k for k in SCORE_ORDER if k in d] + sorted(k for k in d if k not in SCORE_ORDER and k not in ("epoch", "val"))
    return {k: d[k] for k in keys if isinstance(d[k], (int, float)) and not isinstance(d[k], bool)}


def base_models(*idents: Any) -> list[str]:
    """Hub ids of the base CLIP weights (open_clip names and tags that live on the Hub), for the card."""
    out = []
    for ident in idents:
        if not isinstance(ident, dict) or not isinstance(ident.get("model"), str) or not ident.get("pretrained"):
            continue
        try:
            import open_clip

            hub = (open_clip.get_pretrained_cfg(ident["model"], str(ident["pretrained"])) or {}).get("hf_hub", "")
        except Exception:  # a local file or an unknown tag has no Hub id
            raise_if_interrupted()  # (a Ctrl-C that cut open_clip's import short is no such file)
            hub = ""
        repo = "/".join(hub.strip("/").split("/")[:2]) if hub else ""
        if repo and repo not in out:
            out.append(repo)
    return out


def _clip_name(ident: Any) -> str:
    if not isinstance(ident, dict):
        return "unknown"
    return f"{ident.get('model')} ({ident.get('pretrained') or 'random weights'})"


def _card_front_matter(config: dict, rows: list[tuple[str, dict]], bases: list[str]) -> list[str]:
    """The card's YAML front matter (the Hub's metadata: library, base models, dataset, model-index)."""
    import yaml

    student, dataset = config.get("student") or {}, config.get("dataset")
    front: dict[str, Any] = {"library_name": LIBRARY_NAME, "pipeline_tag": PIPELINE_TAG,
                             "tags": ["clip", "knowledge-distillation", "prompt-learning", "promptkd"]}
    if bases:
        front["base_model"] = bases
    benchmark = dataset if isinstance(dataset, str) and ":" not in dataset else None  # not folder:/images:/split:
    if benchmark:  # a user's own folder is no Hub dataset (and its local path stays out of the metadata)
        front["datasets"] = [benchmark]
    if rows:
        front["model-index"] = [{"name": f"promptkd-{student.get('clip', {}).get('model', 'student')}", "results": [{
            "task": {"type": PIPELINE_TAG, "name": "image classification"},
            "dataset": {"name": benchmark or "custom", "type": benchmark or "custom",
                        "split": f"test ({config.get('protocol') or 'protocol unknown'})"},
            "metrics": [{"type": "accuracy" if k != "hm" else "harmonic_mean", "name": f"{label}: {k}", "value": v}
                        for label, scores in rows for k, v in scores.items()]}]}]
    return ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def _card_results(rows: list[tuple[str, dict]], dataset, protocol) -> list[str]:
    """The card's results table (or the line saying there is none)."""
    if not rows:
        return ["No metrics were recorded with this student (it was not exported from a distillation run folder)."]
    keys = list(dict.fromkeys(k for _, s in rows for k in s))
    lines = [f"Top-1 accuracy in % on the test split of {dataset} ({protocol} protocol), "
             "from the run's `metrics.json`:", "",
             "| model | " + " | ".join("HM" if k == "hm" else k for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    return lines + [f"| {label} | " + " | ".join(f"{s[k]:.2f}" if k in s else "" for k in keys) + " |"
                    for label, s in rows]


def _card_provenance(config: dict) -> list[str]:
    """How it was made: the distillation and export command lines, the version and precision."""
    lines = []
    if config.get("trained_with"):
        lines += ["Distillation:", "", "```bash", str(config["trained_with"]), "```", ""]
    if config.get("exported_with"):
        lines += ["Export:", "", "```bash", str(config["exported_with"]), "```", ""]
    return lines + [f"promptkd {config.get('promptkd_version')}, precision {config.get('precision')}."]


def model_card(config: dict, metrics: dict | None) -> str:
    """README.md: YAML front matter (Hub metadata) and the card's text."""
    student, teacher = config.get("student") or {}, config.get("teacher") or {}
    selected = "val" if config.get("selected_on") == "val" else "last"
    rows = score_rows(metrics, selected)
    dataset = config.get("dataset")
    bases = base_models(student.get("clip"), teacher.get("clip"))
    lines = _card_front_matter(config, rows, bases)
    s_name, t_name = _clip_name(student.get("clip")), _clip_name(teacher.get("clip"))
    lines += [
        f"# PromptKD student: {student.get('clip', {}).get('model', 'CLIP')} image classifier, {config['num_classes']} classes",
        "",
        f"A small CLIP image tower ({s_name}) with deep vision prompts and a projector, distilled with "
        f"promptkd (PromptKD, CVPR 2024) from a prompt-tuned teacher CLIP on unlabelled "
        f"images{f' of {dataset}' if dataset else ''}. It maps an image to a feature in the teacher's text space "
        f"and scores it against the teacher's class vectors for the {config['num_classes']} classes in "
        f"`{CLASSES_FILE}`.",
        "",
        "## Use",
        "",
        "```python",
        "import promptkd",
        "clf = promptkd.load(\"hf-hub:ORG/NAME\")   # or the folder's path",
        "clf.predict([\"photo.jpg\"], topk=3)        # [[(class, probability), ...]]",
        "```",
        "",
        f"`clf.image_features(images)` gives L2-normalised features in the teacher's class-vector space; "
        f"`{CLASS_VECTORS_FILE}` holds the class vectors of `{CLASSES_FILE}`. Class vectors for other classes, "
        "made with `promptkd class-vectors` by the same teacher, pair with it: "
        "`promptkd.load(folder, class_vectors=\"new.safetensors\")`.",
        "",
        "## Teacher",
        "",
        f"- CLIP: {t_name}",
        f"- prompts: {json.dumps(teacher.get('prompts'))}, prompts hash `{teacher.get('prompts_hash')}`",
        f"- class vectors made by: {_clip_name((config.get('class_vectors_teacher') or {}).get('clip'))}, "
        f"prompts hash `{(config.get('class_vectors_teacher') or {}).get('prompts_hash')}`",
        "",
        "## Results",
        "",
    ]
    lines += _card_results(rows, dataset, config.get("protocol"))
    lines += [
        "",
        "## Licence",
        "",
        f"The weights hold the image tower of {s_name}; they are a derivative of those CLIP weights and "
        "carry their licence and terms of use (see the source of the base weights"
        + (f": {', '.join(f'https://huggingface.co/{b}' for b in bases)}" if bases else "")
        + "). promptkd's own code is MIT-licensed.",
        "",
        "## How it was made",
        "",
    ]
    lines += _card_provenance(config)
    return "\n".join(lines) + "\n"


def command_line(argv: list[str] | None) -> str | None:
    return shlex.join(argv) if argv else None
