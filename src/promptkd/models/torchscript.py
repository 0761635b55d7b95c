"""Read the weights of a TorchScript archive (OpenAI's `ViT-L-14.pt`) without running any of its code.

`torch.jit.load` compiles the archive's code and runs the `__setstate__` methods it defines while
loading, so a crafted `.pt` can write files (TorchScript has `torch.save`) the moment it is opened.
Here the archive's `data.pkl` is unpickled with an allow-list: TorchScript classes become inert
records, tensors are rebuilt from the archive's raw storages, and anything else is refused. Which
attributes are parameters and buffers is read from the `__parameters__` / `__buffers__` lines of
the archive's class declarations (plain text; nothing is compiled), giving the same names as
`torch.jit.load(path).state_dict()`.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafeArchive(pickle.UnpicklingError):
    """The archive needs something other than tensors and plain TorchScript module records."""


class _Record:
    """An inert stand-in for an instance of a TorchScript class: it only keeps its pickled state."""

    qualname = "?"

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


def _identity(x, *args):
    return x


# The only callables the pickle may name (besides TorchScript classes and storage types).
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): dict,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            qual = f"{module}.{name}"
            if qual not in self.classes:
                self.classes[qual] = type(name, (_Record,), {"qualname": qual})
            return self.classes[qual]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeArchive(f"GLOBAL {module}.{name} is not a tensor or a TorchScript module") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeArchive(f"unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise UnsafeArchive(f"tensor data {key!r} is missing from the archive") from None
            flat = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            if flat.numel() < int(numel):
                raise UnsafeArchive(f"tensor data {key!r} is shorter than its declared size")
            self.storages[key] = flat
        return self.storages[key]


_CLASS = re.compile(r"^class (\w+)\((\w+)\):")
_LIST = re.compile(r"^\s+(__parameters__|__buffers__) = \[(.*)\]\s*$")


def _class_declarations(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[bool, list[str]]]:
    """qualname -> (is a Module, names of its parameters and buffers), from the code/ text files."""
    out: dict[str, tuple[bool, list[str]]] = {}
    for name in archive.namelist():
        if not (name.startswith(f"{prefix}code/__torch__") and name.endswith(".py")):
            continue
        module = name[len(f"{prefix}code/") : -len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8", "replace").splitlines():
            if m := _CLASS.match(line):
                current = f"{module}.{m.group(1)}"
                out[current] = (m.group(2) == "Module", [])
            elif current and (m := _LIST.match(line)):
                out[current][1].extend(re.findall(r'"([^"]+)"', m.group(2)))
    return out


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript module archive; raises UnsafeArchive for anything else."""
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise UnsafeArchive("not a TorchScript module archive (no single <name>/data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise UnsafeArchive("big-endian archives are not supported")
        declared = _class_declarations(archive, prefix)
        unpickler = _Unpickler(archive.read(pkls[0]), archive, prefix)
        root = unpickler.load()

    state_dict: dict[str, torch.Tensor] = {}

    def walk(obj: _Record, at: str) -> None:
        info = declared.get(obj.qualname)
        if info is None or not info[0]:
            raise UnsafeArchive(f"{obj.qualname} is not a module declared in the archive")
        state = obj.__dict__.get("state")
        if not isinstance(state, dict):
            raise UnsafeArchive(f"{obj.qualname} restores itself with its own code (__setstate__); refusing to run it")
        for name in info[1]:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                state_dict[at + name] = value
            elif value is not None:
                raise UnsafeArchive(f"{at}{name} is declared a parameter or buffer but holds {type(value).__name__}")
        for name, value in state.items():
            if isinstance(value, _Record) and declared.get(value.qualname, (False,))[0]:
                walk(value, f"{at}{name}.")

    if not isinstance(root, _Record):
        raise UnsafeArchive("the archive's root object is not a TorchScript module")
    walk(root, "")
    return state_dict
