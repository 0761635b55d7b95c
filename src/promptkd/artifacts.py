"""Safe, self-describing artifacts: safetensors tensors with JSON metadata, written atomically.

Every file promptkd writes (teacher prompts, class vectors, students, checkpoints) goes through
here, so nothing is ever unpickled and a crash mid-write never destroys the previous file.
torch and safetensors are imported inside the functions that need them: the CLI reads JSON and
artifact headers through this module before any heavy import.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptkd.errors import PromptKDError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
_META_KEY = "promptkd"
# The artifacts a run folder holds, by the names every command finds them by.
ARTIFACT_FILES = {"teacher": "teacher.safetensors", "student": "student.safetensors"}
CLASS_VECTORS_FILE = "class_vectors.safetensors"
METRICS_FILE = "metrics.json"  # a run's results (teacher, distill), as JSON


def _new_file_mode(path: Path) -> int:
    """The permissions `open(path, "w")` would give: the old file's, else 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    If the writer raises (or the disk fills up), the temporary file is removed and `path` is left
    as it was. The new file gets the permissions a plain open() would give (mkstemp's are 0600).
    A process killed mid-write can leave a hidden `.NAME.*.tmp` file behind; it is never read.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise about_file(e, path) from e
    try:
        if hasattr(os, "fchmod"):  # POSIX only
            with contextlib.suppress(OSError):
                os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, PromptKDError):
            raise about_file(e, path) from e
        raise


def about_file(e: OSError, path: str | os.PathLike) -> OSError:
    """The same error about `path`: a temporary file's name means nothing to the user. Naming
    another path replaces the name, not adds to it."""
    if e.errno is None:
        return e
    bare = getattr(e, "bare_strerror", e.strerror)
    named = type(e)(e.errno, f"{bare} (writing {path})")
    named.bare_strerror = bare
    return named


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write pretty JSON."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptKDError(f"{path}: not valid JSON ({e})") from None


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save tensors plus a JSON-able metadata dict into one safetensors file, atomically."""
    from safetensors.torch import save as st_save_bytes

    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **meta}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = st_save_bytes(tensors, metadata={_META_KEY: json.dumps(meta)})
    with atomic_open(path, "wb") as f:
        f.write(blob)
    return path


def load_artifact(path: str | os.PathLike, kind: str | None = None,
                  finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a promptkd artifact; check its `kind` when given. Never unpickles.

    With `finite` (the default), a NaN or infinite value in any floating-point tensor is refused,
    naming the tensor: a damaged file must not turn into NaN scores later.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load_bytes

    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        tensors = st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptKDError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    meta = _promptkd_meta(header, path, kind)
    if finite:
        check_finite(tensors, str(path))
    return tensors, meta


def read_artifact_meta(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Only an artifact's metadata: reads the header, not the tensors (a teacher file with frozen
    weights can be a gigabyte)."""
    return artifact_layout(path, kind)[1]


def _promptkd_meta(header: Any, path: Path, kind: str | None) -> dict[str, Any]:
    raw = ((header.get("__metadata__") if isinstance(header, dict) else None) or {}).get(_META_KEY)
    if raw is None:
        raise PromptKDError(f"{path}: safetensors file without promptkd metadata (not a promptkd artifact)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PromptKDError(f"{path}: corrupt promptkd metadata ({e})") from None
    if not isinstance(meta, dict):
        raise PromptKDError(f"{path}: promptkd metadata must be a JSON object")
    if kind is not None and meta.get("kind") != kind:
        raise PromptKDError(f"{path}: expected a {kind} artifact, found kind={meta.get('kind')!r}")
    return meta


_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "BOOL": 1}


@functools.cache
def _torch_dtype(name: str) -> torch.dtype:
    """A safetensors dtype name as a torch dtype (looked up on use: reading a header imports no torch)."""
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
            "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8,
            "BOOL": torch.bool}[name]


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor of a safetensors file lies: dtype (safetensors name), shape and byte offset of its data."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return _torch_dtype(self.dtype_name)

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first dimension."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def artifact_layout(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, TensorLayout], dict[str, Any]]:
    """The tensors' layout and the metadata of a promptkd artifact, from its header alone.

    For files too large to load (a teacher cache at ImageNet size): read_rows() then reads slices
    on demand. Offsets and sizes are checked against the file, so a damaged header is refused here.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptKDError(f"{path}: file not found")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        layout = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = info.get("dtype") if isinstance(info, dict) else None
            shape, (begin, end) = tuple(int(d) for d in info["shape"]), (int(x) for x in info["data_offsets"])
            if dtype not in _ITEMSIZE or any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has an unsupported dtype or shape")
            if end - begin != math.prod(shape) * _ITEMSIZE[dtype] or begin < 0 or 8 + n + end > size:
                raise ValueError(f"tensor {name!r} does not fit the file")
            layout[name] = TensorLayout(name, dtype, shape, 8 + n + begin, end - begin)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptKDError(f"{path}: not a readable safetensors file ({e})") from None
    return layout, _promptkd_meta(header, path, kind)


def read_rows(fd: int, t: TensorLayout, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop (first dimension) of a tensor, read from an open file descriptor (os.pread:
    no shared file position, so loader workers and threads can share the descriptor)."""
    import torch

    nbytes = (stop - start) * t.row_bytes
    buf = bytearray(nbytes)
    got = _pread_into(fd, buf, t.offset + start * t.row_bytes) if nbytes else 0
    if got != nbytes:
        raise PromptKDError(f"tensor {t.name!r}: file ended early (read {got} of {nbytes} bytes)")
    return torch.frombuffer(buf, dtype=t.dtype).view(stop - start, *t.shape[1:]) if nbytes else \
        torch.empty(0, *t.shape[1:], dtype=t.dtype)


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite values in floating-point tensors, naming the first bad tensor.

    A flipped byte in a file can turn one bias into NaN; every later score would then be NaN or
    silently wrong, so loads stop here instead.
    """
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PromptKDError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                                "the file is damaged or was written by a diverged run")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short stable hash of named tensors (for identifying a teacher's prompts)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _pread_into(fd: int, buf: bytearray, offset: int) -> int:
    if hasattr(os, "preadv"):  # Linux, BSDs: straight into the buffer
        return os.preadv(fd, [buf], offset)
    if hasattr(os, "pread"):  # macOS
        data = os.pread(fd, len(buf), offset)
    else:  # Windows: each loader worker has its own descriptor, so seeking is safe
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(buf))
    buf[: len(data)] = data
    return len(data)


def artifact_path(given: str | Path, kind: str, option: str | None = None) -> Path:
    """A `kind` artifact named by its file or by the run folder holding it; the wrong kind, a folder
    of another stage or a missing file is one line naming the option."""
    option = option or f"--{kind}"
    path = Path(given)
    if path.is_dir():
        inside = path / ARTIFACT_FILES[kind]
        if not inside.is_file():
            other = [k for k, name in ARTIFACT_FILES.items() if (path / name).is_file()]
            what = f"a {other[0]} run folder" if other else f"a folder without {ARTIFACT_FILES[kind]}"
            raise PromptKDError(f"{option} {path}: {what}, not a {kind} file or run folder")
        path = inside
    elif not path.is_file():
        raise PromptKDError(f"{option} {path}: {kind} file or run folder not found")
    meta = read_artifact_meta(path)
    if meta.get("kind") != kind:
        raise PromptKDError(f"{option} {path}: expected a {kind} artifact, found kind={meta.get('kind')!r}")
    return path


def student_class_vectors(student: Path, given: str | Path | None, missing: str | None = None) -> Path:
    """The class vectors a student classifies with: `given` (--class-vectors), else those distillation
    wrote next to it (the classifier it was trained on); none is one line (`missing`, or the default)."""
    if given:
        return class_vectors_path(given)
    path = Path(student).parent / CLASS_VECTORS_FILE
    if not path.is_file():
        raise PromptKDError(missing or f"{student}: no class vectors beside it; give --class-vectors FILE")
    return path


def class_vectors_path(given: str | Path, option: str = "--class-vectors") -> Path:
    path = Path(given)
    if path.is_dir() and (path / CLASS_VECTORS_FILE).is_file():
        path = path / CLASS_VECTORS_FILE
    if not path.is_file():
        raise PromptKDError(f"{option} {path}: class-vector file not found")
    read_artifact_meta(path, "class_vectors")
    return path
