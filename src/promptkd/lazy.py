"""Package attributes imported on first use, so that importing a package (as the CLI's parser does)
does not import torch through the modules it re-exports."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module-level `__getattr__` for `package`: `name` comes from the module `table[name]` (or is
    that module, when it is the module's own last component, e.g. a sub-module)."""
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(table[name])
        return module if table[name].rpartition(".")[2] == name else getattr(module, name)

    return __getattr__
