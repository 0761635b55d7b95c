"""Writes are atomic: a failure in the middle of writing (a full disk, a failing fsync, an exception
in the writer) leaves the previous file intact and readable, and leaves no temporary file."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

import promptkd.artifacts as artifacts
from promptkd.artifacts import atomic_open, load_artifact, save_artifact, write_json
from promptkd.cli import main


class _DiskFull:
    """A file object that accepts `budget` bytes, then fails as a full disk does."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def disk_full_after(monkeypatch, budget: int, after_calls: int = 0) -> None:
    """Files opened by atomic_open fail once `budget` bytes are written (from open call `after_calls` on)."""
    real = os.fdopen
    calls = {"n": 0}

    def fdopen(fd, *a, **k):
        calls["n"] += 1
        f = real(fd, *a, **k)
        return _DiskFull(f, budget) if calls["n"] > after_calls else f

    monkeypatch.setattr(artifacts.os, "fdopen", fdopen)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_mid_artifact_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "student.safetensors"
    old = {"w": torch.arange(1000.0)}
    save_artifact(path, old, {"kind": "student", "version": "old"})
    disk_full_after(monkeypatch, budget=100)
    with pytest.raises(OSError, match="No space left") as e:
        save_artifact(path, {"w": torch.zeros(5000)}, {"kind": "student", "version": "new"})
    assert str(path) in str(e.value) and ".tmp" not in str(e.value)  # the file meant, not the temporary one
    tensors, meta = load_artifact(path, kind="student")
    assert torch.equal(tensors["w"], old["w"]) and meta["version"] == "old"
    assert no_temp_files(tmp_path)


def test_failing_fsync_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 1.0})

    def broken_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(artifacts.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        write_json(path, {"accuracy": 2.0})
    assert json.loads(path.read_text()) == {"accuracy": 1.0}
    assert no_temp_files(tmp_path)


def test_exception_inside_the_writer_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"ok": object()})  # json.dump fails half-way through
    assert json.loads(path.read_text()) == {"ok": True}
    with pytest.raises(KeyboardInterrupt), atomic_open(path, "w") as f:
        f.write("{partial")
        raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"ok": True}
    assert no_temp_files(tmp_path)


def test_new_files_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        (tmp_path / "b.json").write_text("{}")
        os.chmod(tmp_path / "b.json", 0o640)
        write_json(tmp_path / "b.json", {"x": 1})
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    finally:
        os.umask(umask)


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_resume_finishes(world, tmp_path, monkeypatch, capsys):
    """Distillation with checkpoint_every=1: the 3rd checkpoint write hits a full disk."""
    run = tmp_path / "run"
    real_save = artifacts.save_artifact
    state = {"checkpoints": 0}

    def save(path, tensors, meta):
        if meta.get("kind") == "checkpoint":
            state["checkpoints"] += 1
            if state["checkpoints"] == 3:
                disk_full_after(monkeypatch, budget=64)
        return real_save(path, tensors, meta)

    import promptkd.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "save_artifact", save)
    code = main(world.distill_args(run, "--checkpoint-every", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "No space left on device" in err, err
    assert "checkpoint.safetensors" in err and ".tmp" not in err, err  # no temporary file name
    _, meta = load_artifact(run / "checkpoint.safetensors", kind="checkpoint")
    assert meta["steps"] == 2  # the last checkpoint that was written whole
    assert no_temp_files(run)

    monkeypatch.undo()
    assert main(world.distill_args(run, "--checkpoint-every", "1", "--resume")) == 0
    assert load_artifact(run / "student.safetensors", kind="student")


# Writes that may bypass promptkd.artifacts: appends to logs, stdout, and generated image datasets.
ALLOWED = {
    ("engine/loop.py", 'open(self.path, "a")'),  # metrics.jsonl: one append per step
    ("toy/pretrain.py", 'open(self.path, "a")'),  # its jsonl log (_JsonLog)
    ("stages/sweep.py", 'open(log, "a")'),  # a sweep job's log: each attempt appended
    ("stages/predict.py", "json.dump("),  # to stdout
    ("toy/world.py", ".save(image_dir / rel)"),  # the toy dataset's PNG images
}
WRITE_PATTERNS = [r"(?<![\w.])open\([^)]*['\"][wax]b?\+?['\"]", r"torch\.save\(", r"json\.dump\(", r"\.write_text\(",
                  r"\.write_bytes\(", r"save_file\(", r"shutil\.copy", r"onnx\.save", r"\.save\((?!.*\*\*)"]


def test_no_write_bypasses_the_atomic_helpers():
    """Every artifact, report and metrics file goes through promptkd.artifacts (atomic)."""
    src = Path(__file__).resolve().parents[2] / "src" / "promptkd"
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if rel == "artifacts.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for pattern in WRITE_PATTERNS:
                if re.search(pattern, code) and not any(rel == f and s in code for f, s in ALLOWED):
                    if pattern == r"\.save\((?!.*\*\*)" and re.search(r"(teacher|student|cv|ClassVectors\(.*\))\.save\(", code):
                        continue  # the model wrappers' save() is save_artifact
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "non-atomic writes:\n" + "\n".join(found)


def test_a_folder_that_cannot_be_written_is_named_not_a_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".report.md.x8f2k.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as e:
        write_json(tmp_path / "report.md", {})
    assert str(tmp_path / "report.md") in str(e.value) and ".tmp" not in str(e.value)
