"""One path for every setting of a stage (TrainConfig, DistillConfig, TeacherConfig): each is a
dataclass field made by `setting()`, holding its default, help, choices, range and flag. From the
fields come the command's options (`add_setting_options`), what they set (`settings_from_args`) and
the checks (`validate`, once, in the config's __post_init__); YAML presets and `--set KEY=VALUE`
set the same fields by name. So a bad value is a one-line error naming the setting, not a
TypeError deep in training, and a new option is one field."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, field, fields
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


def _type_names(f: Field) -> list[str]:
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return [part.strip() for part in annotation.split("|")]


def check_field_types(obj: Any, source: str) -> None:
    """Raise PromptKDError if a field annotated with int/float/bool/str (or `| None`) holds another type.

    Fields with other annotations (nested configs, lists, tuples) are left to their own checks.
    """
    for f in fields(obj):
        names = _type_names(f)
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


def _in_range(value, op: str, bound: float) -> bool:
    return not (isinstance(value, float) and math.isnan(value)) and (value > bound if op == ">" else value >= bound)


def check_ranges(obj: Any, source: str, limits: dict[str, tuple[str, float]]) -> None:
    """Each named field (when not None) must be `op` its bound: {"lr": (">", 0), "epochs": (">=", 1)}.

    A setting out of range is a one-line error naming it, before any model or data is loaded
    (e.g. zero steps per epoch would otherwise train nothing and still write an artifact)."""
    for name, (op, bound) in limits.items():
        value = getattr(obj, name)
        if value is not None and not _in_range(value, op, bound):
            raise PromptKDError(f"{source}: {name} must be {op} {bound:g}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Settings fields: one declaration gives the default, the checks and the command-line option.


def setting(default: Any = MISSING, *, help: str | None = None, flag: str | bool | None = None,
            choices=None, range: tuple[str, float] | None = None, metavar: str | None = None, arg_type=None,
            global_option: bool = False, default_factory: Any = MISSING, options: tuple[str, ...] = ()) -> Any:
    """A settings field. `choices` and `range` (op '>' or '>=', bound) are checked by `validate` and
    by the option while parsing. `flag`: the option's name (default --NAME-WITH-DASHES; a bool is a
    switch to the other value, e.g. --no-val; False: no option, YAML and --set only), `help` its
    help; `arg_type` replaces the check derived from the type and range; `global_option`: the
    option is one of options.add_global_options (--device, --no-progress), read, not added.
    A section (TrainConfig under `train`) lists in `options` the fields of it the command offers."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "range": range,
            "metavar": metavar, "arg_type": arg_type, "global": global_option, "options": tuple(options)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def validate(obj: Any, source: str) -> None:
    """The checks a settings dataclass declares: types, then choices and ranges (None passes)."""
    check_field_types(obj, source)
    for f in fields(obj):
        value, choices, limit = getattr(obj, f.name), f.metadata.get("choices"), f.metadata.get("range")
        if value is None:
            continue
        if choices and value not in choices:
            raise PromptKDError(f"{source}: {f.name} must be one of {', '.join(choices)}, got {value!r}")
        if limit:
            check_ranges(obj, source, {f.name: limit})


def _flag(f: Field) -> str | None:
    flag = f.metadata.get("flag")
    if flag is False or (flag is None and "help" not in f.metadata):  # no option / a plain field
        return None
    return flag or "--" + f.name.replace("_", "-")


def _dest(f: Field) -> str:
    """Where argparse puts the value: the field's name (a global option: its own dest)."""
    return _flag(f).lstrip("-").replace("-", "_") if f.metadata.get("global") else f.name


def option_fields(cls: type) -> list[tuple[str | None, Field, str]]:
    """(section or None, field, flag) of every setting of `cls` that has an option, in field order (a
    section: the fields its `options` name, and its global ones)."""
    out = []
    for f in fields(cls):
        section = f.metadata.get("options")
        if section:
            inner = {g.name: g for g in fields(f.default_factory)}
            chosen = [inner[name] for name in section] + [g for g in inner.values()
                                                          if g.metadata.get("global") and g.name not in section]
            out += [(f.name, g, _flag(g)) for g in chosen]
        elif _flag(f):
            out.append((None, f, _flag(f)))
    return out


def _option_kwargs(f: Field) -> dict:
    """argparse keyword arguments of a field's option: a switch for a bool, else a checked value."""
    from promptkd.options import ranged

    meta, kinds = f.metadata, [n for n in _type_names(f) if n != "None"]
    kwargs = {"dest": f.name, "help": meta["help"], "default": None}
    if kinds == ["bool"]:
        return {**kwargs, "action": "store_const", "const": not _flag(f).startswith("--no-")}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    kind = {"int": int, "float": float}.get(kinds[0]) if len(kinds) == 1 else None
    arg_type = meta["arg_type"] or (ranged(kind, *meta["range"]) if kind and meta["range"] else kind)
    return {**kwargs, "type": arg_type} if arg_type else kwargs


def add_setting_options(p: argparse.ArgumentParser, cls: type) -> None:
    """An option for every setting of `cls` that has one (its flag, help, choices and value check
    from the field), in field order; what they set: `settings_from_args`."""
    for _, f, flag in option_fields(cls):
        if not f.metadata.get("global"):
            assert f.metadata["help"], f"{cls.__name__}.{f.name}: an option needs help"
            p.add_argument(flag, **_option_kwargs(f))


def settings_from_args(cls: type, args: argparse.Namespace) -> dict:
    """The settings of `cls` the command line set: --set KEY=VALUE (NAME or train.NAME), then the
    options of `add_setting_options` and the global ones (a switch counts only when given)."""
    from promptkd.options import parse_set

    data: dict = {}
    for key, value in parse_set(getattr(args, "set", None)):
        put_setting(data, key, value)
    for section, f, flag in option_fields(cls):
        value = getattr(args, _dest(f), None)
        if f.metadata.get("global") and flag.startswith("--no-"):
            value = False if value else None
        if value is not None:
            (data.setdefault(section, {}) if section else data)[f.name] = value
    return data


def merge_settings(*layers: dict) -> dict:
    """Settings mappings (presets, then overrides) merged left to right, a section key by key."""
    merged: dict = {}
    for layer in layers:
        for k, v in layer.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
    return merged


def put_setting(data: dict, key: str, value: Any) -> None:
    """`NAME` or `train.NAME` (from --set or an option) into a stage's settings, whose only section is
    `train` (the teacher's and distillation's)."""
    section, _, name = key.rpartition(".")
    if section not in ("", "train"):
        raise PromptKDError(f"unknown setting {key!r} (use NAME or train.NAME)")
    (data.setdefault("train", {}) if section else data)[name] = value


def rename_keys(d: dict, renames: dict[str, str], source: str) -> dict:
    """Old setting names still read for one release (options.OLD_SPELLINGS), with a warning naming the
    new one; a `section.key` name is the key inside that section."""
    import logging

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in renames.items():
        (old_section, _, old_key), (new_section, _, new_key) = old.rpartition("."), new.rpartition(".")
        src = out.get(old_section) if old_section else out
        if not isinstance(src, dict) or old_key not in src:
            continue
        dst = out.setdefault(new_section, {}) if new_section else out
        if new_key in dst:
            raise PromptKDError(f"{source}: both '{old}' (the old name) and '{new}' are set; keep '{new}'")
        logging.getLogger("promptkd").warning("%s: setting '%s' is deprecated; use '%s'", source, old, new)
        dst[new_key] = src.pop(old_key)
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
