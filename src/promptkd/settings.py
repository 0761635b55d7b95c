"""Settings files and type checks for the settings dataclasses, so a bad YAML preset or a
`--set KEY=VALUE` of the wrong type is a one-line error naming the setting, not a TypeError deep
in training."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from promptkd.errors import PromptKDError

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


def read_yaml(path: str | Path) -> dict:
    """A YAML settings file as a mapping (safe_load: no Python objects)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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


def apply_sets(data: dict, items: list[str] | None, source: str = "--set") -> dict:
    """`data` with each `KEY=VALUE` applied (VALUE read as YAML; a dotted KEY reaches into sections,
    e.g. distill.train.lr=0.02). Whether a key exists is left to the settings' own checks."""
    import yaml

    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain data
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PromptKDError(f"{source} {item!r}: expected KEY=VALUE (e.g. distill.train.lr=0.02)")
        *path, last = key.strip().split(".")
        node = out
        for i, part in enumerate(path):
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise PromptKDError(f"{source} {item!r}: {'.'.join(path[:i + 1])} is not a section")
        node[last] = yaml.safe_load(value)
    return out
