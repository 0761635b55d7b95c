"""Where a CLIP comes from besides open_clip: a registry of model sources, in the style of open_clip's
`add_model_config` and timm's `register_model`.

A source claims every model name that starts with its prefix (`toy-` for the toy world's CLIPs) and
is a function `(model, pretrained, *, device, init_seed) -> ClipBundle` that `load_clip` calls in
place of open_clip. It may be registered by name, as "package.module:function", and is then imported
on the first load of one of its names: registering costs no import, so the package's entry layer
(`promptkd/__init__.py`, which Python runs before any promptkd module, whichever way in: CLI,
`promptkd.load`, the demo, a test calling `load_clip` directly) registers the toy world's source
without importing torch or the toy package, and models/ never imports the layers above it.

`random_weights` (whether a weights setting asks for a random initialisation) lives here too, so that
models/ and the settings above it read weights settings alike (promptkd.settings re-exports it).
No torch here, and nothing from promptkd but errors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from promptkd.errors import PromptKDError

_SOURCES: dict[str, str | Callable[..., Any]] = {}


def random_weights(weights: str | None) -> bool:
    """Whether a weights setting asks for a random initialisation: none / null / "none" / ""."""
    return weights is None or weights.strip().lower() in ("none", "")


def register_model_source(prefix: str, loader: str | Callable[..., Any]) -> None:
    """Let `load_clip` build every model named `prefix...` with `loader` (a function, or its
    "module:function" name, imported on first use). Registering the same prefix again replaces it."""
    if not prefix or not isinstance(prefix, str):
        raise ValueError("a model source needs a non-empty name prefix")
    if isinstance(loader, str) and ":" not in loader:
        raise ValueError(f"model source {loader!r}: give it as 'module:function'")
    _SOURCES[prefix] = loader


def source_loader(model: str) -> Callable[..., Any] | None:
    """The loader registered for `model`'s prefix (the longest one that matches), or None: open_clip's."""
    prefixes = [p for p in _SOURCES if model.startswith(p)]
    if not prefixes:
        return None
    prefix = max(prefixes, key=len)
    loader = _SOURCES[prefix]
    if isinstance(loader, str):
        module, _, name = loader.partition(":")
        try:
            loader = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise PromptKDError(f"{model}: its model source {_SOURCES[prefix]!r} cannot be imported ({e})") from None
        _SOURCES[prefix] = loader
    return loader
