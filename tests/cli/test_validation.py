"""Every check that needs no heavy work runs before any: a bad number, device, output or input is one
line with exit code 2, and no CLIP or dataset has been loaded when it is reported (the loaders are
replaced by ones that fail the test)."""

from __future__ import annotations

import os

import pytest
import torch
from cli_helpers import distill_command, teacher_command
from tinyclip import one_line

from promptkd.cli import main


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading a CLIP or reading a dataset now fails the test (not one line, not exit 2)."""
    import promptkd.data.registry as registry
    import promptkd.models.loading as loading

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the command line was checked")

    for owner, name in ((loading, "load_clip"), (loading, "clip_from_source"), (registry, "build_dataset")):
        monkeypatch.setattr(owner, name, heavy)


def _fails_in_one_line(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    err = one_line(err)
    assert err.startswith("promptkd"), err
    return err


def _read_only_dir(tmp_path):
    if os.geteuid() == 0:  # root writes through file modes; /sys refuses new entries even to root
        return "/sys/promptkd-read-only-test"
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro / "out")


CASES = {
    # numbers (the list): argparse checks them while parsing
    "eval batch size 0": (lambda c, d, r, t: ["eval", str(r.student), "--batch-size", "0"], "expected an integer >= 1"),
    "num workers -1": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--num-workers", "-1"], "integer >= 0"),
    "n-ctx-vision 0": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--n-ctx-vision", "0"], "integer >= 1"),
    "distill n-ctx-vision 0": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--n-ctx-vision", "0"],
                               "integer >= 1"),
    "opset 99": (lambda c, d, r, t: ["export", str(r.student), "--opset", "99", "--out", str(t / "m.onnx")],
                 "from 17 to"),
    "max steps 0": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--max-steps-per-epoch", "0"],
                    "integer >= 1"),
    "max steps -1": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--max-steps-per-epoch", "-1"],
                     "integer >= 1"),
    "lr -1": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--lr", "-1"], "a number > 0"),
    "lr nan": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--lr", "nan"], "a number > 0"),
    "kd weight -5": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--kd-weight", "-5"],
                     "a number >= 0"),
    "temperature 0": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--temperature", "0"],
                      "a number > 0"),
    "cache batch size 0": (lambda c, d, r, t: ["cache", "--teacher", str(r.teacher), "--dataset", f"folder:{d}",
                                               "--batch-size", "0", "--out", str(t / "o")], "integer >= 1"),
    "lr 0 in --set": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--set", "train.lr=0"],
                      "lr must be > 0"),
    "temperature 0 in --set": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--set",
                                                   "temperature=0"], "temperature must be > 0"),
    "max steps 0 in --set": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--set",
                                                 "train.max_steps_per_epoch=0"], "max_steps_per_epoch must be >= 1"),
    # devices
    "device gpu": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--device", "gpu"], "invalid device 'gpu'"),
    "device cuda:x": (lambda c, d, r, t: ["--device", "cuda:x", "eval", str(r.student)], "invalid device"),
    # outputs
    "out is a file (run folder)": (lambda c, d, r, t: distill_command(c, d, r.teacher, r.student / "student.safetensors"),
                                   "is a file; give a folder"),
    # outputs never clobber inputs, nor another command's run (also with --overwrite / --resume)
    "out is the teacher": (lambda c, d, r, t: ["class-vectors", str(r.teacher), "--classes", "a,b", "--overwrite",
                                               "--out", str(r.teacher / "teacher.safetensors")], "is the teacher"),
    "out contains the teacher": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, r.teacher), "--overwrite"],
                                 "contains the teacher"),
    "out inside the image folder": (lambda c, d, r, t: teacher_command(c, d, d / "run"), "lies inside the image folder"),
    "overwrite of another command's run": (lambda c, d, r, t: [*teacher_command(c, d, r.student), "--overwrite"],
                                           "holds a distillation run (made by `promptkd distill`), not a teacher run"),
    "resume in another command's run": (lambda c, d, r, t: [*teacher_command(c, d, r.student), "--resume"],
                                        "--resume: "),
    "out is a folder (file)": (lambda c, d, r, t: ["class-vectors", str(r.teacher), "--classes", "a", "--out", str(t)],
                               "is a folder; give a file name"),
    "out inside a file": (lambda c, d, r, t: teacher_command(c, d, r.teacher / "teacher.safetensors" / "x"),
                          "is a file, not a folder"),
    "out read-only": (lambda c, d, r, t: teacher_command(c, d, _read_only_dir(t)), "cannot write in"),
    # inputs
    "a plain folder as --teacher": (lambda c, d, r, t: distill_command(c, d, d, t / "o"),
                                    "a folder without teacher.safetensors"),
    "a student run as --teacher": (lambda c, d, r, t: distill_command(c, d, r.student, t / "o"), "a student run folder"),
    "a student file as --teacher": (lambda c, d, r, t: distill_command(c, d, r.student / "student.safetensors", t / "o"),
                                    "expected a teacher artifact, found kind='student'"),
    "class vectors as --student": (lambda c, d, r, t: ["export", str(r.student / "class_vectors.safetensors")],
                                   "expected a student artifact"),
    "missing CLIP config": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--student-model",
                                                str(t / "nope.json")], "model config not found"),
    "missing CLIP weights": (lambda c, d, r, t: [*distill_command(c, d, r.teacher, t / "o"), "--student-weights",
                                                 str(t / "nope.pt")], "weights file not found"),
    "resume without a checkpoint": (lambda c, d, r, t: [*teacher_command(c, d, t / "o"), "--resume"],
                                    "no checkpoint.safetensors to continue from"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checked_before_any_heavy_work(case, clips, data, runs, tmp_path, capsys, no_heavy_work):
    build, expected = CASES[case]
    err = _fails_in_one_line(build(clips, data, runs, tmp_path), capsys)
    assert expected in err, err


COMMAND_LINES = {
    "teacher": ["teacher", "--out", "o"], "class-vectors": ["class-vectors", "t"], "cache": ["cache", "--teacher", "t",
    "--dataset", "d", "--out", "o"], "distill": ["distill", "--out", "o"], "eval": ["eval", "r"], "export": ["export", "s"],
    "predict": ["predict", "x.png"], "report": ["report", "r", "--out", "o"],
    "import-official": ["import-official", "teacher", "c", "--out", "o"], "demo": ["demo"],
    "toy pretrain": ["toy", "pretrain", "teacher", "--steps", "1"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
@pytest.mark.parametrize("where", ["before", "after"])
def test_device_cuda_without_cuda_is_one_line_in_every_command(command, where, capsys, no_heavy_work):
    argv = ["--device", "cuda", *COMMAND_LINES[command]] if where == "before" else [*COMMAND_LINES[command], "--device", "cuda"]
    assert "CUDA is not available" in _fails_in_one_line(argv, capsys)

