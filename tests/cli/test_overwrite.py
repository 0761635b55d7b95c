"""A finished result is never replaced silently: a second run refuses (one line, exit 2, saying what
is there and how to proceed), --overwrite replaces it after removing the old promptkd files (so an
interrupted overwrite never leaves old and new files mixed), and --resume continues."""

from __future__ import annotations

import hashlib
import time

import pytest
from cli_helpers import dassl_teacher_checkpoint, distill_command, teacher_command
from tinyclip import killed_at_call, one_line

from promptkd.cli import main
from promptkd.runs import LOCK_FILE


def _digests(folder):
    """sha256 of every file but the folder lock's (it names the last process that ran there, refused or not)."""
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _one_line(capsys) -> str:
    return one_line(capsys.readouterr().err)


def _command(name, clips, data, runs, tmp_path) -> list[str]:
    out = tmp_path / "out"
    if name == "import-official":  # the only one that needs an official checkpoint written first
        return ["-q", "import-official", "teacher",
                str(dassl_teacher_checkpoint(clips.teacher_cfg, tmp_path / "official" / "model.pth.tar")),
                "--teacher-model", str(clips.teacher_cfg), "--teacher-weights", str(clips.teacher_weights),
                "--out", str(out)]
    return {
        "teacher": teacher_command(clips, data, out),
        "distill": distill_command(clips, data, runs.teacher, out),
        "cache": ["-q", "cache", "--teacher", str(runs.teacher), "--dataset", f"folder:{data}", "--protocol", "cross",
                  "--views", "1", "--out", str(out)],
        "class-vectors": ["-q", "class-vectors", str(runs.teacher), "--classes", "red,green", "--out",
                          str(out / "cv.safetensors")],
        "export": ["-q", "export", str(runs.student), "--no-check", "--out", str(out / "m.onnx")],
    }[name]


@pytest.mark.parametrize("command", ["teacher", "distill", "cache", "class-vectors", "export", "import-official"])
def test_a_finished_result_is_refused_then_replaced_with_overwrite(command, clips, data, runs, tmp_path, capsys):
    argv = _command(command, clips, data, runs, tmp_path)
    out = tmp_path / "out"
    assert main(argv) == 0
    before = _digests(out)
    assert main(argv) == 2
    err = _one_line(capsys)
    assert "already holds" in err and "--overwrite" in err, err
    assert _digests(out) == before  # untouched
    (out / "my-notes.txt").write_text("mine")  # a file of the user's in the output folder
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "my-notes.txt").read_text() == "mine"  # only promptkd's own files are replaced


def test_demo_refuses_a_finished_demo_folder(tmp_path, capsys, monkeypatch):
    import promptkd.stages.demo as demo

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "report.md").write_text("old")
    (tmp_path / "d" / "teacher").mkdir()
    (tmp_path / "d" / "teacher" / "teacher.safetensors").write_text("old")
    seen = []

    def fake_demo(out, cfg):
        seen.append(sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE))  # its own lock stays
        (out / "report.md").write_text("new")
        return {k: {} for k in ("student_zeroshot", "teacher_zeroshot", "teacher", "student")}

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 2
    assert "already holds a finished demo" in _one_line(capsys)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--overwrite"]) == 0
    assert seen == [[]]  # the demo started in an emptied folder


def test_an_interrupted_overwrite_never_leaves_a_mixed_folder(clips, data, runs, tmp_path, capsys):
    import promptkd.engine.loop as loop

    out = tmp_path / "out"
    argv = distill_command(clips, data, runs.teacher, out)
    assert main(argv) == 0
    started = time.time_ns()
    with killed_at_call(loop, "save_checkpoint", 1):  # interrupted at the end of its first epoch
        main([*argv, "--overwrite", "--debug"])
    left = [p for p in out.rglob("*") if p.is_file()]
    assert not {"student.safetensors", "metrics.json", "checkpoint.safetensors"} & {p.name for p in left}
    old = [p.name for p in left if p.stat().st_mtime_ns < started]
    assert old == [], f"files of the replaced run survived: {old}"
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2  # nothing to resume yet
    assert "no checkpoint.safetensors to continue from" in _one_line(capsys)
    assert main(argv) == 2  # the partial run is not silently restarted
    assert "unfinished distillation run" in _one_line(capsys)
    assert main([*argv, "--overwrite"]) == 0


def test_overwrite_and_resume_exclude_each_other(clips, data, runs, tmp_path, capsys):
    assert main([*distill_command(clips, data, runs.teacher, tmp_path / "o"), "--overwrite", "--resume"]) == 2
    assert "exclude each other" in _one_line(capsys)


def test_append_to_updates_its_own_file_but_no_other(runs, tmp_path, capsys):
    cv = tmp_path / "cv.safetensors"
    assert main(["-q", "class-vectors", str(runs.teacher), "--classes", "red", "--out", str(cv)]) == 0
    assert main(["-q", "class-vectors", str(runs.teacher), "--classes", "green", "--append-to", str(cv)]) == 0
    other = tmp_path / "other.safetensors"
    other.write_bytes(cv.read_bytes())
    assert main(["-q", "class-vectors", str(runs.teacher), "--classes", "blue", "--append-to", str(cv), "--out",
                 str(other)]) == 2
    assert "already holds a class-vector file" in _one_line(capsys)
