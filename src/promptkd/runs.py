"""Run folders: what a command's output records about what it was built from, and how a command
claims its output.

- `run.json` in a run folder lists every input by absolute path and sha256 (CLIP weights and
  config files, teacher, class vectors, teacher cache) and the dataset (name, root, image-list
  digest), so later commands can take the folder alone and a moved or changed file is named.
- An output that already holds a result is refused, unless `--overwrite` (its promptkd files are
  removed first, so an interrupted overwrite never leaves old and new files mixed) or `--resume`
  (continue an unfinished run) applies; writability is checked before any work starts.
- An output never clobbers an input (`check_apart`), nor a file of another command's run folder,
  also with `--overwrite`; a folder holding another command's run is refused by name.
- One writer per run folder: a run holds an exclusive OS lock (`flock`) on its folder's
  `.promptkd.lock` for its whole life; the OS drops it when the process dies, even by SIGKILL.
- One owner per training run's folder (`RunFolder`): it claims the folder, writes run.json (start:
  the inputs; finish: the outputs it holds) and metrics.json, and names every other file in it (the
  checkpoint, the stage's artifacts); the engine writes its own files (engine.config.ENGINE_FILES).

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
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from promptkd.artifacts import ARTIFACT_FILES, CLASS_VECTORS_FILE, METRICS_FILE, write_json
from promptkd.engine.config import CHECKPOINT_NAME, ENGINE_FILES, METRICS_LOG_NAME
from promptkd.errors import PromptKDError
from promptkd.files import check_file_record, file_digest, file_record, is_file_record  # noqa: F401 (re-exported)

RUN_FILE = "run.json"
LOCK_FILE = ".promptkd.lock"
# Files of a run folder that another command's --out may never replace, while the run's own list of
# outputs (run.json, written when it finishes) is not there yet.
RUN_FOLDER_FILES = (*ARTIFACT_FILES.values(), "student-best-val.safetensors", CLASS_VECTORS_FILE,
                    CHECKPOINT_NAME, METRICS_FILE, METRICS_LOG_NAME,
                    "manifest.json", "images.json", "shard-*.safetensors", RUN_FILE)
# What each command's run folder is called in messages.
RUN_KINDS = {"teacher": "teacher run", "distill": "distillation run", "cache": "teacher cache",
             "import-official": "imported artifact", "demo": "demo"}
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

    record = {"kind": "promptkd_run", "command": command, "status": "running", "promptkd": __version__,
              "command_line": shlex.join(COMMAND_LINE) if COMMAND_LINE else None,
              "cwd": os.getcwd(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "inputs": inputs, "outputs": []}
    path = Path(out_dir) / RUN_FILE
    write_json(path, record)
    return path


def finish_run_record(out_dir: str | os.PathLike, outputs: list[str]) -> None:
    """Mark run.json finished, listing the files written."""
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


def run_finished(folder: str | os.PathLike) -> bool:
    """Whether a folder's run.json says its run finished (False for none, or an unreadable one)."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text()).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


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
    record = read_run_record(path.parent)
    if record is not None and path.exists() and not in_place:
        listed = record.get("outputs") if isinstance(record.get("outputs"), list) else []
        if path.name in listed or any(fnmatch.fnmatchcase(path.name, pat) for pat in RUN_FOLDER_FILES):
            raise PromptKDError(f"{option} {path} is a file of the {_made_by(record)} in {path.parent}; "
                                f"--overwrite never replaces another run's files: choose another {option}")
    if path.exists() and not (overwrite or in_place):
        raise PromptKDError(f"{path} already holds {_a(what)}; pass --overwrite to replace it, or choose another "
                            f"{option}")
    return path


def _made_by(record: dict) -> str:
    """'teacher run (made by `promptkd teacher`)': what a run.json says its folder holds."""
    command = record.get("command")
    return f"{RUN_KINDS.get(command, 'run')} (made by `promptkd {command}`)"


def check_apart(out: str | os.PathLike, inputs: dict, option: str = "--out", *, roots: dict | None = None) -> None:
    """An output never clobbers an input, also with --overwrite: `out` may not be an input, lie inside
    one (a folder: a cache, an image folder) or contain one (a run folder holding the teacher).

    `inputs`: {what: path or None}; `roots`: data roots holding many datasets, which `out` may lie
    inside (it is only refused when it is or contains one)."""
    target = Path(out).resolve()
    for what, given, inside_ok in [*((w, p, False) for w, p in inputs.items()),
                                   *((w, p, True) for w, p in (roots or {}).items())]:
        if not given:
            continue
        src = Path(given).resolve()
        if target == src:
            how = "is"
        elif target in src.parents:
            how = "contains"
        elif src in target.parents and not inside_ok:
            how = "lies inside"
        else:
            continue
        raise PromptKDError(f"{option} {out} {how} the {what} {given}, an input of this command; an output never "
                            f"replaces an input (also not with --overwrite): choose another {option}")


# ---------------------------------------------------------------------------------------------
# One writer per run folder

_HELD: dict[Path, int] = {}  # folder -> the descriptor of its locked lock file, while this process runs there


def lock_folder(folder: str | os.PathLike, option: str = "--out") -> None:
    """Take the exclusive lock on `folder` (created if need be) for as long as this process runs there
    (until release_folders). Another live holder is one line naming its PID, host and start time. A
    lock left by a killed process is free: the OS releases flock locks when their holder dies."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"PID {h['pid']} on {h['host']}, started {h['started']}: {h.get('command_line') or 'promptkd'}"
        except (ValueError, KeyError, TypeError):
            who = "a process that is starting"
        raise PromptKDError(f"{option} {folder} is in use by another promptkd run ({who}); wait for it to end "
                            f"or choose another {option}") from None
    except BaseException:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command_line": shlex.join(COMMAND_LINE) if COMMAND_LINE else None}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[folder] = fd


def release_folders() -> None:
    """Give up every folder lock this process holds (the CLI does, when a command ends)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


# A forked child (a DataLoader worker) shares the lock with its parent until it closes its copy: it
# closes it at once, so a killed run's folder is free even while its workers are still exiting.
os.register_at_fork(after_in_child=release_folders)


@dataclass
class FolderClaim:
    """An output folder a command may write: `prepare()` locks it, checks it again under the lock (a
    run that finished meanwhile is not replaced), removes the stale files an --overwrite replaces
    (call it once every check has passed) and creates the folder."""

    path: Path
    stale: list[Path] = field(default_factory=list)
    recheck: Callable[[], FolderClaim] | None = None
    lock: bool = True

    def prepare(self) -> Path:
        if is_main_process():
            if self.lock and Path(self.path).resolve() not in _HELD:
                lock_folder(self.path)
                if self.recheck is not None:
                    self.stale = self.recheck().stale
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
                 option: str = "--out", command: str | None = None, lock: bool = True) -> FolderClaim:
    """An output folder: a folder (or nothing yet), writable, not in use by another run (its lock),
    holding no other command's run (run.json's `command`, with --overwrite and --resume too) and no
    result of ours unless --overwrite (remove them first) or --resume (continue from `marker`, e.g.
    the checkpoint).

    `outputs`: the names (or glob patterns) the command writes; `finished`: the one whose presence
    means the result is complete (or a test of the folder). `lock` False: no lock file (a folder meant
    for upload, written once by one command).
    """
    path = Path(path)
    if overwrite and resume:
        raise PromptKDError("--overwrite and --resume exclude each other: start again, or continue")
    if path.exists() and not path.is_dir():
        raise PromptKDError(f"{option} {path} is a file; give a folder")
    _check_writable(path, option)
    if not is_main_process():  # torchrun: rank 0 decides (the others could see its new files)
        return FolderClaim(path)
    if lock and path.is_dir():  # at once, before any work: a folder in use is refused by its lock
        lock_folder(path, option)

    def inspect() -> FolderClaim:
        return _inspect_folder(path, outputs, overwrite=overwrite, resume=resume, what=what, finished=finished,
                               marker=marker, option=option, command=command)

    claim = inspect()
    claim.recheck, claim.lock = inspect, lock  # again under the lock, where the folder was made after this check
    return claim


def _inspect_folder(path: Path, outputs, *, overwrite, resume, what, finished, marker, option, command) -> FolderClaim:
    record = read_run_record(path) if command else None
    if record is not None and record.get("command") != command:
        verb = "--resume" if resume else "--overwrite" if overwrite else option
        raise PromptKDError(f"{verb}: {path} holds {_a(_made_by(record))}, not {_a(what)}; a command only continues "
                            f"or replaces its own kind of run: choose another {option}")
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


# ---------------------------------------------------------------------------------------------
# A training run's folder


def run_outputs(*artifacts: str) -> tuple[str, ...]:
    """Everything a training run writes into its folder: the stage's `artifacts`, the engine's files
    and the run's own (run.json, metrics.json). An --overwrite removes these first."""
    return (*artifacts, *ENGINE_FILES, RUN_FILE, METRICS_FILE)


@dataclass
class RunFolder:
    """The one owner of a training run's folder (`teacher`, `distill`). `claim` takes it for the CLI
    (claim_folder and its lock); `start` writes run.json with the inputs, `finish` marks it finished
    with the outputs the folder holds; `file` names each artifact the stage writes (only the
    declared ones) and `write_metrics` writes metrics.json. The engine trains in `path` and writes
    its own files there (engine.config.ENGINE_FILES), the checkpoint at `checkpoint`.

    A Python caller may make one straight from a folder (no claim): the in-process stages do."""

    path: Path
    command: str  # the command it records in run.json, e.g. "distill"
    artifacts: tuple[str, ...] = ()  # the stage's own files (names or glob patterns)
    claimed: FolderClaim | None = None

    @classmethod
    def claim(cls, path: str | os.PathLike, command: str, artifacts: tuple[str, ...], *, overwrite: bool,
              resume: bool, finished: str) -> RunFolder:
        """Claim `path` for a run of `command` (see claim_folder): a finished result (`finished`, an
        artifact) is refused unless --overwrite or --resume, and --resume needs the checkpoint."""
        claimed = claim_folder(path, run_outputs(*artifacts), overwrite=overwrite, resume=resume,
                               what=RUN_KINDS[command], finished=finished, marker=CHECKPOINT_NAME, command=command)
        return cls(Path(path), command, tuple(artifacts), claimed)

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def outputs(self) -> tuple[str, ...]:
        return run_outputs(*self.artifacts)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def prepare(self) -> RunFolder:
        """Once every check has passed: lock the folder, remove what an --overwrite replaces, create it."""
        if self.claimed is not None:
            self.claimed.prepare()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    def file(self, name: str) -> Path:
        """Where the stage writes its artifact `name`; one it did not declare is a programming error."""
        if not any(fnmatch.fnmatchcase(name, pat) for pat in self.artifacts):
            raise ValueError(f"{name} is not an artifact of a {self.command} run ({', '.join(self.artifacts)})")
        return self.path / name

    def start(self, inputs: dict) -> None:
        """run.json, status running, with every input (the main process writes it)."""
        if is_main_process():
            write_run_record(self.path, self.command, inputs)

    def write_metrics(self, metrics: dict) -> Path:
        """metrics.json: the run's results, for later reading (the stage returns them too)."""
        path = self.path / METRICS_FILE
        write_json(path, metrics)
        return path

    def finish(self) -> list[str]:
        """run.json, status finished, listing the outputs this run's folder holds; returns them."""
        outputs = [p.name for p in promptkd_files(self.path, self.outputs)]
        if is_main_process():
            finish_run_record(self.path, outputs)
        return outputs
