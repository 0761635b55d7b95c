"""Content hashes and file records: how an artifact or a run names a file it was built from
(absolute path, size, sha256), and the check that a recorded file is still the same.

Its own module, below both `runs` (run folders) and `models` (a CLIP remembers its weights file), so
that neither imports the other for it. No torch here: the CLI checks records before any heavy import.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from promptkd.errors import PromptKDError

_HASH_CACHE_MIN_BYTES = 16 << 20  # smaller files are hashed in a few milliseconds


def _hash_cache_file() -> Path:
    base = os.environ.get("PROMPTKD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "promptkd")
    return Path(base) / "sha256.json"


def _read_hash_cache() -> dict:
    try:
        data = json.loads(_hash_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_hash_cache(cache: dict) -> None:
    """Best effort: a read-only home only costs a second hashing later."""
    from promptkd.artifacts import write_json

    cache = {k: v for k, v in cache.items() if os.path.exists(k)}  # forget files that are gone
    try:
        write_json(_hash_cache_file(), dict(list(cache.items())[-500:]))
    except OSError:
        pass


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes. Big files (CLIP weights) are hashed once per (path, size, mtime)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    cached = None
    if st.st_size >= _HASH_CACHE_MIN_BYTES:
        cache = _read_hash_cache()
        entry = cache.get(path)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            return entry[2]
        cached = cache
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cached is not None:
        cached.pop(path, None)
        cached[path] = [*stamp, digest]
        _write_hash_cache(cached)
    return digest


def file_record(path: str | os.PathLike) -> dict:
    """How a run names an input file: absolute path, size and sha256."""
    path = Path(path).resolve()
    return {"path": str(path), "size": path.stat().st_size, "sha256": file_digest(path)}


def is_file_record(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("path"), str) and isinstance(value.get("sha256"), str)


def check_file_record(record: dict, what: str, fix: str) -> Path:
    """The recorded file, if it is still there with the same bytes; else one line naming the
    expected path and hash and how to proceed (`fix`, e.g. 'pass it with --student-weights PATH')."""
    path = Path(record["path"])
    if not path.is_file():
        raise PromptKDError(f"{what}: {path} (sha256 {record['sha256']}) no longer exists; {fix}")
    digest = file_digest(path)
    if digest != record["sha256"]:
        raise PromptKDError(f"{what}: {path} has changed since it was recorded (sha256 {digest}, expected "
                            f"{record['sha256']}); {fix}")
    return path
