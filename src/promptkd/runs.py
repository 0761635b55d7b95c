"""Run folders: what a command's output records about what it was built from, and how a command
claims its output.

- `run.json` in a run folder lists every input by absolute path and sha256 (CLIP weights and
  config files, teacher, class vectors, teacher cache) and the dataset (name, root, image-list
  digest), so later commands can take the folder alone and a moved or changed file is named.
- An output that already holds a result is refused, unless `--overwrite` (its promptkd files are
  removed first, so an interrupted overwrite never leaves old and new files mixed) or `--resume`
  (continue an unfinished run) applies; writability is checked before any work starts.

No torch here: the CLI runs these checks before any heavy import.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from promptkd.errors import PromptKDError
from promptkd.files import check_file_record, file_digest, file_record, is_file_record  # noqa: F401 (re-exported)

RUN_FILE = "run.json"
COMMAND_LINE: list[str] | None = None  # set by promptkd.cli.main, recorded in run.json


# ---------------------------------------------------------------------------------------------
# Data records (file records live in promptkd.files, re-exported here)


def items_digest(items) -> str:
    """A short hash of an image list (paths in order): which images a run or a cache used."""
    h = hashlib.sha256()
    for path, _ in items:
        h.update(str(path).encode() + b"\0")
    return h.hexdigest()[:16]


def dataset_record(name: str, root, train_items, **settings) -> dict:
    """How a run names its data: the dataset, its root (absolute), and the digest of the images it
    trained on (hashing every image's bytes would cost as much as an epoch)."""
    return {"name": name, "root": None if root is None else str(Path(root).resolve()),
            "train_images": len(train_items), "train_digest": items_digest(train_items), **settings}


# ---------------------------------------------------------------------------------------------
# run.json


def write_run_record(out_dir: str | os.PathLike, command: str, inputs: dict) -> Path:
    """Write out_dir/run.json: the command and its inputs (paths and hashes), status running
    (finish_run_record marks it finished)."""
    from promptkd import __version__
    from promptkd.artifacts import write_json

    record = {"kind": "promptkd_run", "command": command, "status": "running", "promptkd": __version__,
              "command_line": shlex.join(COMMAND_LINE) if COMMAND_LINE else None,
              "cwd": os.getcwd(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "inputs": inputs, "outputs": []}
    path = Path(out_dir) / RUN_FILE
    write_json(path, record)
    return path


def finish_run_record(out_dir: str | os.PathLike, outputs: list[str]) -> None:
    """Mark run.json finished, listing the files written."""
    from promptkd.artifacts import write_json

    record = read_run_record(out_dir)
    if record is not None:
        write_json(Path(out_dir) / RUN_FILE, {**record, "status": "finished", "outputs": outputs})


def read_run_record(folder: str | os.PathLike) -> dict | None:
    """A run folder's run.json, or None when there is none (a plain folder)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PromptKDError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(record, dict) or record.get("kind") != "promptkd_run":
        raise PromptKDError(f"{path}: not a promptkd run record")
    return record


# ---------------------------------------------------------------------------------------------
# Claiming an output


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun: only rank 0 removes files


def _check_writable(path: Path, option: str) -> None:
    """The nearest existing folder at or above `path` must accept a new file."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise PromptKDError(f"{option} {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".promptkd-write-test-"):
            pass
    except OSError as e:
        raise PromptKDError(f"{option} {path}: cannot write in {probe} ({e.strerror or e})") from None


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def claim_file(path: str | os.PathLike, *, overwrite: bool, what: str, option: str = "--out",
               in_place: bool = False) -> Path:
    """An output file: not a folder, writable, and not already there unless --overwrite (or
    `in_place`: the command updates that very file, as `class-vectors --append-to` does)."""
    path = Path(path)
    if path.is_dir():
        raise PromptKDError(f"{option} {path} is a folder; give a file name")
    _check_writable(path.parent, option)
    if path.exists() and not (overwrite or in_place):
        raise PromptKDError(f"{path} already holds {_a(what)}; pass --overwrite to replace it, or choose another "
                            f"{option}")
    return path


@dataclass
class FolderClaim:
    """An output folder a command may write: `prepare()` removes the stale files an --overwrite
    replaces (call it once every check has passed) and creates the folder."""

    path: Path
    stale: list[Path] = field(default_factory=list)

    def prepare(self) -> Path:
        if is_main_process():
            for p in self.stale:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
        return self.path


def promptkd_files(folder: Path, outputs: tuple[str, ...]) -> list[Path]:
    """The files in `folder` that a command writes (names or glob patterns), plus the hidden
    temporary files an interrupted atomic write can leave behind."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if any(fnmatch.fnmatchcase(name, pat) for pat in outputs) or (
                name.startswith(".") and name.endswith(".tmp") and any(
                    fnmatch.fnmatchcase(name[1:].rsplit(".", 2)[0], pat) for pat in outputs)):
            found.append(entry)
    return found


def claim_folder(path: str | os.PathLike, outputs: tuple[str, ...], *, overwrite: bool, resume: bool = False,
                 what: str, finished: str | Callable[[Path], bool] | None = None, marker: str | None = None,
                 option: str = "--out") -> FolderClaim:
    """An output folder: a folder (or nothing yet), writable, and holding no result of ours unless
    --overwrite (remove them first) or --resume (continue from `marker`, e.g. the checkpoint).

    `outputs`: the names (or glob patterns) the command writes; `finished`: the one whose presence
    means the result is complete (or a test of the folder).
    """
    path = Path(path)
    if overwrite and resume:
        raise PromptKDError("--overwrite and --resume exclude each other: start again, or continue")
    if path.exists() and not path.is_dir():
        raise PromptKDError(f"{option} {path} is a file; give a folder")
    _check_writable(path, option)
    if not is_main_process():  # torchrun: rank 0 decides (the others could see its new files)
        return FolderClaim(path)
    present = promptkd_files(path, outputs)
    has_marker = marker is not None and (path / marker).exists()
    if resume:
        if marker is not None and not has_marker:
            raise PromptKDError(f"--resume: {path} holds no {marker} to continue from")
        return FolderClaim(path)
    if present and not overwrite:
        done = finished(path) if callable(finished) else finished is not None and (path / finished).exists()
        names = ", ".join(p.name for p in present[:3]) + (", ..." if len(present) > 3 else "")
        if done:
            raise PromptKDError(f"{path} already holds a finished {what} ({names}); pass --overwrite to replace it, "
                                f"or choose another {option}")
        hint = "pass --resume to continue it or --overwrite to start again" if has_marker else \
            "pass --overwrite to start again"
        raise PromptKDError(f"{path} already holds an unfinished {what} ({names}); {hint}")
    return FolderClaim(path, present if overwrite else [])
