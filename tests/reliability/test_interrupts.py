"""Issue #23: Ctrl-C is an interrupt in every command, at several points of each: exit 130, one
line, and the previous result intact. Real processes (killable.py blocks them at a named call, where
the SIGINT then lands on a fast or a slow machine), plus the case of the issue: a Ctrl-C that cut
`import onnxruntime` short and was taken for "onnxruntime is not installed"."""

from __future__ import annotations

import hashlib
import importlib.abc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import child_ctrl_c, start_killable, wait_until_ready
from tinyclip import one_line

from promptkd.cli import main

INTERRUPTED = "promptkd: interrupted"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".promptkd.lock"}


def _ctrl_c_at(stop: str, argv: list[str], tmp_path: Path) -> str:
    """Run the CLI until `stop` (killable.py's EVENT:N), press Ctrl-C there; its one stderr line."""
    ready = tmp_path / f"ready-{stop.replace(':', '-')}"
    proc = start_killable(["-q", *argv], stop, ready, stderr=subprocess.PIPE, preexec_fn=child_ctrl_c)
    wait_until_ready(proc, ready, timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert out == "", out  # nothing claims a result
    return one_line(err)


@pytest.fixture
def exported(student_run):
    """A finished export beside the student: what an interrupted `export --overwrite` must keep."""
    out = student_run / "student.onnx"
    assert main(["-q", "export", str(student_run), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("stop", ["call:promptkd.stages.export.load_classifier:1",  # before any work
                                  "call:promptkd.stages.export.parity:1",  # new file written, not checked
                                  "call:os.replace:2"])  # checked, about to replace the old file
def test_ctrl_c_in_export_keeps_the_previous_file(stop, student_run, exported, tmp_path):
    before = _digests(student_run)
    assert _ctrl_c_at(stop, ["export", str(student_run), "--out", str(exported), "--overwrite"], tmp_path) \
        == INTERRUPTED
    assert _digests(student_run) == before  # the old export intact, no temporary or unchecked file left


@pytest.mark.parametrize("stop", ["call:promptkd.stages.class_vectors.compute_class_vectors:1",
                                  "call:os.replace:1"])  # the new vectors written, about to replace
def test_ctrl_c_in_class_vectors_keeps_the_previous_file(stop, world, tmp_path):
    out = tmp_path / "cv" / "classes.safetensors"
    argv = ["class-vectors", *world.teacher_args(), "--classes", "red,green", "--out", str(out)]
    assert main(["-q", *argv]) == 0
    before = _digests(out.parent)
    argv[argv.index("red,green")] = "red,green,blue"
    assert _ctrl_c_at(stop, [*argv, "--overwrite"], tmp_path) == INTERRUPTED
    assert _digests(out.parent) == before


def test_ctrl_c_in_cache_keeps_the_previous_cache_or_advises_resume(world, tmp_path):
    argv = ["cache", *world.teacher_args(), "--dataset", f"folder:{world.data}", "--views", "1", "--shard-size", "4",
            "--device", "cpu", "--no-progress"]
    done = tmp_path / "done"
    assert main(["-q", *argv, "--out", str(done)]) == 0
    before = _digests(done)
    # while the teacher loads, before --overwrite has removed anything: the finished cache stays
    assert _ctrl_c_at("call:promptkd.inputs.load_teacher:1", [*argv, "--out", str(done), "--overwrite"], tmp_path) \
        == INTERRUPTED
    assert _digests(done) == before
    # once a shard is listed: the interrupted build says how to continue, and --resume finishes it
    fresh = tmp_path / "fresh"
    assert _ctrl_c_at("shard:1", [*argv, "--out", str(fresh)], tmp_path) == (
        f"{INTERRUPTED}; {fresh} holds the last checkpoint: rerun the same command with --resume to continue")
    assert main(["-q", *argv, "--out", str(fresh), "--resume"]) == 0
    assert {k: v for k, v in _digests(fresh).items() if k != "run.json"} == \
        {k: v for k, v in before.items() if k != "run.json"}


@pytest.mark.parametrize("stop", ["call:promptkd.stages.predict.build_classifier:1",  # loading the model
                                  "call:promptkd.data.dataset.load_rgb:2"])  # reading the images
def test_ctrl_c_in_predict_is_one_line(stop, world, student_run, tmp_path):
    images = sorted(str(p) for p in (world.data / "test").rglob("*.png"))
    assert _ctrl_c_at(stop, ["predict", *images, "--student", str(student_run), "--device", "cpu"], tmp_path) \
        == INTERRUPTED


class _CtrlCDuringImport(importlib.abc.MetaPathFinder):
    """`import NAME` interrupted by a real SIGINT, surfacing as an ImportError: as numpy's C extension
    does ("cannot load module more than once") when Ctrl-C lands inside its import."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the SIGINT handler raises in here
        except KeyboardInterrupt:
            raise ImportError(f"{fullname}: cannot load module more than once per process") from None
        raise AssertionError("the SIGINT never arrived")


def test_ctrl_c_inside_import_onnxruntime_is_no_missing_package(student_run, exported, capsys, monkeypatch):
    """Issue #23, case 4: exit 0 and "parity check skipped: onnxruntime is not installed", with the
    unchecked file in place of the old one. Now: exit 130, one line, the old file intact."""
    before = _digests(student_run)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_CtrlCDuringImport("onnxruntime"), *sys.meta_path])
        code = main(["-q", "export", str(student_run), "--out", str(exported), "--overwrite"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert one_line(capsys.readouterr().err) == INTERRUPTED
    assert _digests(student_run) == before


def test_a_ctrl_c_that_some_code_swallowed_is_still_no_success(tmp_path, capsys, monkeypatch):
    """If code anywhere swallows the KeyboardInterrupt (a broad except in a library) and the command
    returns, the CLI still ends with 130 and one line, never with exit 0."""
    import promptkd.stages.report as report

    def swallows(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:  # noqa: BLE001 (what a careless library does)
            pass
        return {}

    monkeypatch.setattr(report, "report", swallows)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert one_line(capsys.readouterr().err) == INTERRUPTED


def test_an_optional_package_is_missing_only_without_a_ctrl_c():
    from promptkd.errors import note_interrupt, optional_import

    assert optional_import("promptkd_no_such_package") is None
    note_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            optional_import("promptkd_no_such_package")
    finally:
        note_interrupt(reset=True)
