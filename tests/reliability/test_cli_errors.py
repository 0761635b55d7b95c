"""Every sub-command: an unknown option, a missing file or a wrong type is one line on stderr,
exit code 2 and no traceback; `--debug` shows the traceback instead. Ctrl-C is one line, exit 130.

Each case is parametrized only over the commands it applies to (demo and toy pretrain read no
user files; report and import-official take no number), and the list of commands is fixed here,
so a sub-command that disappears from the parser fails instead of being skipped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from reliability_helpers import KILL_SEED, child_ctrl_c, start_killable, wait_until_ready
from tinyclip import one_line

from promptkd.cli import build_parser, main

MISSING = "/nonexistent/promptkd-reliability"

COMMANDS = ["teacher", "class-vectors", "cache", "distill", "eval", "export", "predict", "info", "report",
            "sweep", "import-official", "demo", "toy"]


def _subparsers():
    return next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")


def test_every_command_is_registered():
    assert set(_subparsers().choices) == set(COMMANDS)


def _argv(command: str, tmp) -> list[str]:
    """A complete command line for `command` (whose input files do not exist, where it reads any)."""
    out = str(tmp / "out")
    return {
        "teacher": ["teacher", "--dataset", f"folder:{MISSING}", "--teacher-model", f"{MISSING}.json", "--out", out],
        "class-vectors": ["class-vectors", "--teacher", f"{MISSING}.safetensors", "--classes", "a,b", "--out", out],
        "cache": ["cache", "--teacher", f"{MISSING}.safetensors", "--dataset", f"folder:{MISSING}", "--out", out],
        "distill": ["distill", "--dataset", f"folder:{MISSING}", "--teacher", f"{MISSING}.safetensors", "--out", out],
        "eval": ["eval", "--dataset", f"folder:{MISSING}", "--student", f"{MISSING}.safetensors",
                 "--class-vectors", f"{MISSING}-cv.safetensors"],
        "export": ["export", "--student", f"{MISSING}.safetensors", "--class-vectors", f"{MISSING}-cv.safetensors",
                   "--out", out],
        "predict": ["predict", f"{MISSING}.jpg", "--model", f"{MISSING}.onnx"],
        "info": ["info", f"{MISSING}.safetensors"],
        "report": ["report", MISSING, "--out", out],
        "sweep": ["sweep", "--protocol-file", f"{MISSING}.yaml", "--teachers", MISSING, "--out", out],
        "import-official": ["import-official", "teacher", f"{MISSING}.pth.tar", "--teacher-model", "ViT-B-16",
                            "--teacher-weights", f"{MISSING}.pt", "--out", out],
        "demo": ["demo", "--config", f"{MISSING}.yaml", "--out", out],
        "toy": ["toy", "pretrain", "teacher", "--steps", "1", "--out", out],
    }[command]


# An option of an int/float type per command, to give a value of the wrong type.
WRONG_TYPE = {
    "teacher": ["--epochs", "three"], "class-vectors": ["--text-chunk", "many"], "cache": ["--views", "x"],
    "distill": ["--lr", "fast"], "eval": ["--batch-size", "big"], "export": ["--opset", "new"],
    "predict": ["--topk", "all"], "demo": ["--seed", "lucky"], "toy": ["--steps", "many"], "sweep": ["--nproc", "two"],
}
READS_USER_FILES = [c for c in COMMANDS if c != "toy"]  # toy pretrain reads no user files
NEED_ARGUMENTS = [c for c in COMMANDS if c not in ("demo", "toy")]  # the demo runs as it is, `toy` prints its help


def _one_line(err: str) -> str:
    err = one_line(err)
    assert err.startswith("promptkd"), err
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*_argv(command, tmp_path), "--no-such-option"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-option" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", READS_USER_FILES)
def test_missing_file(command, tmp_path, capsys):
    assert main(_argv(command, tmp_path)) == 2
    err = _one_line(capsys.readouterr().err)
    assert "promptkd: error:" in err and "nonexistent" in err, err
    assert "not found" in err or "no such" in err.lower(), err


@pytest.mark.parametrize("command", READS_USER_FILES)
def test_missing_file_with_debug_raises(command, tmp_path):
    with pytest.raises(Exception) as e:  # noqa: PT011 - each command has its own error type
        main(["--debug", *_argv(command, tmp_path)])
    assert "nonexistent" in str(e.value)


@pytest.mark.parametrize("command", sorted(WRONG_TYPE))
def test_wrong_type(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*_argv(command, tmp_path), *WRONG_TYPE[command]])
    assert e.value.code == 2
    assert "invalid" in _one_line(capsys.readouterr().err)


def test_commands_without_numbers_have_no_numeric_option():
    """Why report and import-official are not in WRONG_TYPE: they take no number at all."""
    sub = _subparsers()
    for command in sorted(set(COMMANDS) - set(WRONG_TYPE)):
        typed = [a.option_strings for a in sub.choices[command]._actions if a.type not in (None, str)
                 and a.option_strings != ["--device"]]
        assert typed == [], (command, typed)


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_wrong_type_in_yaml_config(command, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: three\n")
    argv = [command, "--config", str(tmp_path / "bad.yaml"), "--dataset", f"folder:{MISSING}",
            "--out", str(tmp_path / "out")]
    if command == "distill":
        argv += ["--teacher", f"{MISSING}.safetensors"]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "epochs" in err and "three" in err, err


@pytest.mark.parametrize("command", ["teacher", "distill"])
@pytest.mark.parametrize("value", ["train.lr=fast", "vision_depth=[1]", "train.epochs=0", "n_ctx_vision=0"])
def test_wrong_value_in_set(command, value, tmp_path, capsys):
    argv = [command, "--set", value, "--dataset", f"folder:{MISSING}", "--out", str(tmp_path / "o")]
    if command == "distill":
        argv += ["--teacher", f"{MISSING}.safetensors"]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert value.split("=")[0].split(".")[-1] in err, err


def test_wrong_type_in_teacher_set(tmp_path, capsys):
    assert main(["teacher", "--set", "gpa=maybe", "--dataset", f"folder:{MISSING}", "--out", str(tmp_path / "o")]) == 2
    assert "gpa" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", NEED_ARGUMENTS)
def test_subcommand_without_arguments(command, capsys):
    """argparse's own error for a missing required option, or the command's: one line, exit 2."""
    try:
        code = main([command])
    except SystemExit as e:
        code = e.code
    assert code == 2, command
    _one_line(capsys.readouterr().err)


def test_bare_promptkd_prints_help_with_exit_2(capsys):
    assert main([]) == 2
    assert "usage: promptkd" in capsys.readouterr().out


def test_real_process_prints_exactly_one_line(tmp_path):
    """In a real process too (logging set up, warnings on): stderr is the one error line."""
    argv = [sys.executable, "-m", "promptkd.cli", *_argv("distill", tmp_path)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("promptkd: error:"), plain.stderr


# ---------------------------------------------------------------------------------------------
# Ctrl-C


# The stage function each command's work goes through, to interrupt it there.
WORK = {"teacher": ("promptkd.stages.teacher", "train_teacher"), "cache": ("promptkd.stages.cache", "build_teacher_cache"),
        "export": ("promptkd.stages.export", "load_classifier")}


@pytest.mark.parametrize("command", sorted(WORK))
def test_ctrl_c_is_one_line_with_exit_130(command, world, tmp_path, capsys, monkeypatch, request):
    """An interrupt inside the work: one line, exit 130; --resume is advised only by a command that
    has it, and only when its folder holds something to continue from."""
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(WORK[command][0]), WORK[command][1], interrupted)
    out = tmp_path / "out"
    if command == "export":  # only export needs a student run
        argv = ["export", str(request.getfixturevalue("student_run")), "--out", str(out / "m.onnx")]
    else:
        argv = {"teacher": world.teacher_train_args(out),
                "cache": ["cache", *world.teacher_args(), "--dataset", f"folder:{world.data}", "--out", str(out)]}[command]
    assert main(argv) == 130
    assert _one_line(capsys.readouterr().err) == "promptkd: interrupted"  # nothing to resume: no advice
    if command != "export":  # the same interrupt once a checkpoint / manifest exists
        (out / ("checkpoint.safetensors" if command == "teacher" else "manifest.json")).write_text("{}")
        assert main([*argv, "--resume"]) == 130
        err = _one_line(capsys.readouterr().err)
        assert err == (f"promptkd: interrupted; {out} holds the last checkpoint: rerun the same command with "
                       "--resume to continue"), err


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Ctrl-C as in a terminal, even where the test run itself was started with SIGINT ignored (a
    background job, nohup, some CI runners): Python then leaves it ignored, and so would its children."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_that_surfaces_as_another_error_is_still_one_line(tmp_path, capsys, monkeypatch):
    """A Ctrl-C inside a C extension's import can come out as an ImportError (numpy's "cannot load
    module more than once"): it is reported as the interruption it was, not as a traceback."""
    import promptkd.stages.report as report

    def cut_short(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the SIGINT handler raises in here
        except KeyboardInterrupt:
            raise ImportError("cannot load module more than once per process") from None

    monkeypatch.setattr(report, "report", cut_short)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == "promptkd: interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # called from Python: handler restored


def _interrupt_after(argv: list[str], seconds: float, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=child_ctrl_c)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("seconds", [0.3, 0.8, *(round(random.Random(KILL_SEED + i).uniform(0.1, 2.5), 2)
                                                 for i in range(3))])
def test_ctrl_c_while_starting_is_one_line(seconds, tmp_path):
    """Ctrl-C in the first moments (imports, building the parser, loading torch, numpy's C extension):
    one line, 130. Besides two fixed moments, three seeded ones (RELIABILITY_SEED tries others)."""
    done = _interrupt_after([sys.executable, "-m", "promptkd.cli", "eval", "--clip-model", "ViT-B-16", "--dataset",
                             f"folder:{tmp_path}", "--device", "cpu"], seconds)
    if done.returncode == 2:  # the machine was fast: the command had already failed (an empty folder)
        assert done.stderr.startswith("promptkd: error:")
        return
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "promptkd: interrupted", done.stderr


def test_ctrl_c_while_training_advises_resume(world, tmp_path):
    """A real process interrupted mid-training: exit 130, the last stderr line advises --resume, and
    the checkpoint it names lets --resume finish."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    # It blocks right after writing its first checkpoint, where the Ctrl-C then lands on any machine.
    proc = start_killable(["-q", *world.distill_args(out, "--checkpoint-every", "1")], "checkpoint:1", ready,
                          stderr=subprocess.PIPE, preexec_fn=child_ctrl_c)
    wait_until_ready(proc, ready, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"promptkd: interrupted; {out} holds the last checkpoint: rerun the "
                                            "same command with --resume to continue")
    assert main([*world.distill_args(out), "--resume"]) == 0
