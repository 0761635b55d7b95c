"""Settings files and type checks for the settings dataclasses, so a bad YAML preset or a
`--set KEY=VALUE` of the wrong type is a one-line error naming the setting, not a TypeError deep
in training."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from promptkd.errors import PromptKDError
from promptkd.models.sources import random_weights  # noqa: F401 (re-exported: models/ needs it too)

_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null"}


def _matches(value: Any, name: str) -> bool:
    if name == "None":
        return value is None
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def check_field_types(obj: Any, source: str) -> None:
    """Raise PromptKDError if a field annotated with int/float/bool/str (or `| None`) holds another type.

    Fields with other annotations (nested configs, lists, tuples) are left to their own checks.
    """
    for f in fields(obj):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        names = [part.strip() for part in annotation.split("|")]
        if not names or any(n not in _NAMES for n in names):
            continue
        value = getattr(obj, f.name)
        if not any(_matches(value, n) for n in names):
            expected = " or ".join(_NAMES[n] for n in names)
            raise PromptKDError(f"{source}: {f.name} must be {expected}, got {value!r}")


def require_two_classes(classnames, dataset: str, what: str = "classes") -> None:
    """Training needs two classes at least: over one class every softmax is 1, the loss is 0 and
    the accuracy 100% whatever was learnt."""
    if len(classnames) < 2:
        raise PromptKDError(f"{dataset}: {len(classnames)} {what} ({', '.join(map(repr, classnames))}); training "
                            "needs at least two (over one class the loss is always 0 and the accuracy 100%)")


def read_yaml(path: str | Path) -> dict:
    """A YAML settings file as a mapping (safe_load: no Python objects)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: config file not found")
    try:
        from promptkd.options import yaml_value

        data = yaml_value(path.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as e:
        raise PromptKDError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PromptKDError(f"{path}: expected a mapping of settings at the top level")
    return data


def check_known_keys(cls: type, d: dict, source: str, what: str = "setting") -> None:
    """A settings mapping may only name fields of the dataclass `cls` (typos must not pass silently)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise PromptKDError(f"{source}: unknown {what}(s) {unknown}; known: {', '.join(sorted(known))}")


def check_ranges(obj: Any, source: str, limits: dict[str, tuple[str, float]]) -> None:
    """Each named field (when not None) must be `op` its bound: {"lr": (">", 0), "epochs": (">=", 1)}.

    A setting out of range is a one-line error naming it, before any model or data is loaded
    (e.g. zero steps per epoch would otherwise train nothing and still write an artifact)."""
    import math

    for name, (op, bound) in limits.items():
        value = getattr(obj, name)
        if value is None:
            continue
        ok = not (isinstance(value, float) and math.isnan(value)) and (value > bound if op == ">" else value >= bound)
        if not ok:
            raise PromptKDError(f"{source}: {name} must be {op} {bound:g}, got {value!r}")


def put_setting(data: dict, key: str, value: Any) -> None:
    """`NAME` or `train.NAME` (from --set or an option) into a stage's settings, whose only section is
    `train` (the teacher's and distillation's)."""
    section, _, name = key.rpartition(".")
    if section not in ("", "train"):
        raise PromptKDError(f"unknown setting {key!r} (use NAME or train.NAME)")
    (data.setdefault("train", {}) if section else data)[name] = value


def rename_keys(d: dict, renames: dict[str, str], source: str) -> dict:
    """Old setting names still read for one release, with a warning naming the new one."""
    import logging

    out = dict(d)
    for old, new in renames.items():
        if old in out:
            if new in out:
                raise PromptKDError(f"{source}: both '{old}' (the old name) and '{new}' are set; keep '{new}'")
            logging.getLogger("promptkd").warning("%s: setting '%s' is deprecated; use '%s'", source, old, new)
            out[new] = out.pop(old)
    return out


def apply_sets(data: dict, items: list[str] | None) -> dict:
    """`data` with each `--set KEY=VALUE` applied (options.parse_set reads them; a dotted KEY reaches
    into sections, e.g. distill.train.lr=0.02). Whether a key exists is left to the settings' own checks."""
    import yaml

    from promptkd.options import parse_set

    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain data
    for key, value in parse_set(items):
        *path, last = key.split(".")
        node = out
        for i, part in enumerate(path):
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise PromptKDError(f"--set {key}={value!r}: {'.'.join(path[:i + 1])} is not a section")
        node[last] = value
    return out
