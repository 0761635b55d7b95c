"""Type checks for the settings dataclasses, so a value of the wrong type in a YAML preset or a
`--set KEY=VALUE` is a one-line error naming the setting, not a TypeError deep in training."""

from __future__ import annotations

from dataclasses import fields
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
