"""`promptkd info PATH`: what a promptkd file or folder is, read from headers and JSON only.

Every kind promptkd writes: teacher, student and class-vector files, the one-file student, a
checkpoint, a teacher cache, run folders (teacher, distill, cache, import-official), ONNX exports,
model folders. It says the kind, the teacher and student identities, the classes, precision and
sizes, the metrics when the run recorded them, and what it was built from. No torch is imported
(safetensors headers are read directly; an ONNX file is read with the onnx package), so it answers
at once even for a gigabyte teacher.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from promptkd.artifacts import METRICS_FILE
from promptkd.errors import PromptKDError

_KIND_NAMES = {"teacher": "teacher (PromptSRC prompts)", "student": "student (prompts and projector)",
               "class_vectors": "class vectors", "student_classifier": "one-file student (deployable)",
               "checkpoint": "training checkpoint", "teacher_cache_shard": "teacher cache shard"}


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _clip(ident: Any) -> str | None:
    if not isinstance(ident, dict):
        return None
    seed = ident.get("init_seed")
    weights = ident.get("pretrained") or ("random" if seed is None else f"random, seed {seed}")
    return f"{ident.get('model')} ({weights})"


def _teacher(ident: Any) -> str | None:
    if not isinstance(ident, dict) or not ident:
        return None
    parts = [_clip(ident.get("clip")) or "CLIP unknown"]
    if isinstance(ident.get("prompts"), dict):
        p = ident["prompts"]
        parts.append(f"prompts depth {p.get('vision_depth')}/{p.get('text_depth')} x {p.get('n_ctx_vision')}/"
                     f"{p.get('n_ctx_text')} tokens (vision/text)")
    if ident.get("prompts_hash"):
        parts.append(f"prompts hash {ident['prompts_hash']}")
    return ", ".join(parts)


def _classes(names: Any) -> str | None:
    if not isinstance(names, list):
        return None
    shown = ", ".join(str(c) for c in names[:5])
    return f"{len(names)} ({shown}{', ...' if len(names) > 5 else ''})"


def _scores(d: Any) -> str:
    if not isinstance(d, dict):
        return ""
    from promptkd.sharing import SCORE_ORDER

    keys = [k for k in SCORE_ORDER if k in d] + [k for k in d if k not in SCORE_ORDER and k not in ("epoch", "val")]
    return ", ".join(f"{'HM' if k == 'hm' else k} {d[k]:.2f}" for k in keys
                     if isinstance(d[k], (int, float)) and not isinstance(d[k], bool) and math.isfinite(d[k]))


def _metrics_lines(metrics: Any) -> dict[str, str]:
    """Test scores of a distillation's metrics.json: baseline rows and the student's."""
    if not isinstance(metrics, dict):
        return {}
    out = {}
    base = metrics.get("baseline") or {}
    for key, label in (("student_zero_shot", "student zero-shot"), ("teacher", "teacher")):
        if _scores(base.get(key)):
            out[f"metrics: {label}"] = _scores(base[key])
    for key, label in (("last", "distilled (last epoch)"), ("best_val", "distilled (best val epoch)")):
        row = (metrics.get("results") or {}).get(key)
        if _scores(row):
            out[f"metrics: {label}"] = _scores(row) + (f" (epoch {row['epoch']})" if "epoch" in row else "")
    if isinstance(metrics.get("val_acc"), (int, float)):  # a teacher's metrics.json
        out["metrics: val accuracy"] = f"{metrics['val_acc']:.2f}"
    return out


def _precision(layout: dict) -> str:
    """The floating-point tensors' dtype (integer counters such as BatchNorm's are not the precision)."""
    names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}
    dtypes = sorted({names[t.dtype_name] for t in layout.values() if t.dtype_name in names})
    return "/".join(dtypes) or "integer only"


def safetensors_info(path: Path) -> dict[str, Any]:
    from promptkd.artifacts import artifact_layout

    layout, meta = artifact_layout(path)
    kind = meta.get("kind")
    values = sum(math.prod(t.shape) for t in layout.values())
    info: dict[str, Any] = {"kind": _KIND_NAMES.get(kind, kind), "file size": _size(path.stat().st_size),
                            "tensors": f"{len(layout)}, {values:,} values, {_precision(layout)}" if layout else "none"}
    if kind == "teacher":
        info["teacher"] = _teacher(meta)
    elif kind in ("student", "student_classifier"):
        student = meta.get("student") if kind == "student_classifier" else meta
        info["student"] = _clip((student or {}).get("clip"))
        prompts = (student or {}).get("prompts") or {}
        info["student prompts"] = f"depth {prompts.get('vision_depth')} x {prompts.get('n_ctx_vision')} tokens"
        info["distilled from"] = _teacher(meta.get("teacher"))
        if kind == "student_classifier":
            info["classes"] = _classes(meta.get("classnames"))
            info["class vectors made by"] = _teacher(meta.get("class_vectors_teacher"))
            info["input"] = f"{meta.get('image_size')} px, {meta.get('interpolation')} resize, mean {meta.get('mean')}"
            info["precision"] = meta.get("precision")
        else:
            info["projects to"] = f"dim {meta.get('teacher_dim')}"
            info["selected on"] = meta.get("selected_on") and f"{meta['selected_on']} (epoch {meta.get('epoch')})"
    elif kind == "class_vectors":
        info["classes"] = _classes(meta.get("classnames"))
        info["dim"] = meta.get("dim")
        info["made by teacher"] = _teacher(meta.get("teacher"))
    elif kind == "checkpoint":
        info["epoch, step"] = f"{meta.get('epoch')}, {meta.get('step')}"
    if isinstance(meta.get("clip_source"), dict):
        info["built from"] = _source(meta["clip_source"])
    if path.name in ("student.safetensors", "teacher.safetensors"):
        info.update(_run_metrics(path.parent))
    return info


def _source(source: dict) -> str:
    def one(v):
        return v.get("path") if isinstance(v, dict) else v
    return f"CLIP {one(source.get('model'))}, weights {one(source.get('weights'))}"


def _run_metrics(folder: Path) -> dict[str, str]:
    metrics_file = folder / METRICS_FILE
    if not metrics_file.is_file():
        return {}
    try:
        return _metrics_lines(json.loads(metrics_file.read_text()))
    except (OSError, ValueError):
        return {}


def onnx_info(path: Path) -> dict[str, Any]:
    try:
        import onnx
    except ImportError:
        raise PromptKDError("reading an ONNX file needs the onnx package (pip install 'promptkd[onnx]')") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise PromptKDError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:160]})") from None
    meta = {}
    for prop in model.metadata_props:  # promptkd.* keys, JSON values (promptkd.deploy writes them)
        if prop.key.startswith("promptkd."):
            try:
                meta[prop.key.removeprefix("promptkd.")] = json.loads(prop.value)
            except json.JSONDecodeError:
                meta[prop.key.removeprefix("promptkd.")] = prop.value
    features = meta.get("format") == "promptkd-onnx-features/1"
    info: dict[str, Any] = {
        "kind": "ONNX image side (image -> features)" if features else "ONNX classifier (image -> logits)",
        "format": meta.get("format") or "not a promptkd export (no promptkd metadata)",
        "file size": _size(path.stat().st_size),
        "student": _clip((meta.get("student") or {}).get("clip")),
        "distilled from": _teacher(meta.get("teacher")),
        "classes": _classes(meta.get("classnames")),
        "class vectors made by": _teacher(meta.get("class_vectors_teacher")),
        "input": f"image {meta.get('image_size')} px, normalised" if meta.get("image_size") else None,
        "precision": meta.get("precision"), "opset": meta.get("opset"),
    }
    if features:
        info["pairs with"] = f"{meta.get('class_vectors_file')} (class vectors, dim {meta.get('feature_dim')})"
    return info


def folder_info(folder: Path) -> dict[str, Any]:
    from promptkd import sharing
    from promptkd.runs import read_run_record

    if (folder / sharing.CONFIG_FILE).is_file():
        config = sharing.read_folder_config(folder)
        info = {"kind": "model folder (promptkd export --format folder)", "size": _size(_folder_bytes(folder)),
                "files": ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())),
                "student": _clip((config.get("student") or {}).get("clip")),
                "distilled from": _teacher(config.get("teacher")),
                "classes": f"{config.get('num_classes')} ({sharing.CLASSES_FILE})",
                "dataset": config.get("dataset") and f"{config['dataset']} ({config.get('protocol')})",
                "precision": config.get("precision")}
        for label, scores in (config.get("metrics") or {}).items():
            info[f"metrics: {label}"] = _scores(scores)
        info["exported with"] = config.get("exported_with")
        return info
    if (folder / "manifest.json").is_file():
        from promptkd.artifacts import read_json

        m = read_json(folder / "manifest.json")
        if isinstance(m, dict) and m.get("kind") == "teacher_cache":
            shards = m.get("shards") if isinstance(m.get("shards"), list) else []
            done = sum(int(s.get("end", 0)) - int(s.get("start", 0)) for s in shards if isinstance(s, dict))
            return {"kind": "teacher cache (teacher image features of augmented views)",
                    "size": _size(_folder_bytes(folder)), "teacher": _teacher(m.get("teacher")),
                    "images": f"{done} of {m.get('n_images')} cached, {m.get('views')} views each",
                    "shards": len(shards), "dim": m.get("dim"), "precision": m.get("dtype")}
    record = read_run_record(folder)
    if record is None:
        raise PromptKDError(f"{folder}: not a promptkd folder (no run.json, config.json or manifest.json)")
    inputs = record.get("inputs") or {}
    info = {"kind": f"{record.get('command')} run folder", "status": record.get("status"),
            "size": _size(_folder_bytes(folder)),
            "files": ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))}
    for name in ("teacher.safetensors", "student.safetensors"):
        if (folder / name).is_file():
            inner = safetensors_info(folder / name)
            info.update({k: v for k, v in inner.items() if k not in ("kind", "file size", "tensors")})
    dataset = inputs.get("dataset") if isinstance(inputs.get("dataset"), dict) else {}
    if dataset:
        info["dataset"] = f"{dataset.get('name')} ({dataset.get('protocol') or 'protocol not recorded'}, " \
                          f"{dataset.get('train_images')} training images)"
    built = [f"{k} {v['path']}" for k, v in inputs.items() if isinstance(v, dict) and isinstance(v.get("path"), str)]
    if built:
        info["built from"] = "; ".join(built)
    info["command"] = record.get("command_line")
    return info


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `path` is, as ordered label -> text (None values are left out)."""
    path = Path(path)
    if path.is_dir():
        info = folder_info(path)
    elif not path.is_file():
        raise PromptKDError(f"{path}: no such file or folder")
    elif path.suffix == ".onnx":
        info = onnx_info(path)
    elif path.suffix == ".json":
        info = _json_info(path)
    else:
        info = safetensors_info(path)
    return {"path": str(path), **{k: v for k, v in info.items() if v not in (None, "")}}


def _json_info(path: Path) -> dict[str, Any]:
    from promptkd.artifacts import read_json

    data = read_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "promptkd_run":
        return folder_info(path.parent)
    if kind in ("distill_metrics", "eval_metrics"):
        info = {"kind": kind.replace("_", " "), "dataset": f"{data.get('dataset')} ({data.get('protocol')})"}
        info.update(_metrics_lines(data))
        if kind == "eval_metrics":
            info["scores"] = _scores(data.get("results"))
        return info
    raise PromptKDError(f"{path}: not a promptkd JSON file (kind {kind!r})")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="say what a promptkd file or folder is (kind, models, classes, sizes, metrics)",
        description="Describe a teacher, student, class-vector, one-file student or checkpoint file, an ONNX "
                    "export, a teacher cache, a run folder or a model folder, from headers and JSON only.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to describe")
    p.add_argument("--json", action="store_true", help="print one JSON object per path instead of text")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for i, given in enumerate(args.paths):
        info = describe(given)
        if args.json:
            print(json.dumps(info))
            continue
        if i:
            print()
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key + ':':<{width + 1}} {value}")
    return 0
