"""Every sub-command: an unknown option, a missing file or a wrong type is one line on stderr,
exit code 2 and no traceback; `--debug` shows the traceback instead."""

from __future__ import annotations

import subprocess
import sys

import pytest

from promptkd.cli import build_parser, main

MISSING = "/nonexistent/promptkd-reliability"


def _commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


PRESENT = _commands()


def _argv(command: str, tmp) -> list[str]:
    """A complete command line for `command` whose input files do not exist."""
    out = str(tmp / "out")
    return {
        "teacher": ["teacher", "--dataset", f"folder:{MISSING}", "--model", f"{MISSING}.json", "--out", out],
        "class-vectors": ["class-vectors", "--teacher", f"{MISSING}.safetensors", "--classes", "a,b", "--out", out],
        "cache": ["cache", "--teacher", f"{MISSING}.safetensors", "--dataset", f"folder:{MISSING}", "--out", out],
        "distill": ["distill", "--dataset", f"folder:{MISSING}", "--teacher", f"{MISSING}.safetensors", "--out", out],
        "eval": ["eval", "--dataset", f"folder:{MISSING}", "--student", f"{MISSING}.safetensors",
                 "--class-vectors", f"{MISSING}-cv.safetensors"],
        "export": ["export", "--student", f"{MISSING}.safetensors", "--class-vectors", f"{MISSING}-cv.safetensors",
                   "--out", out],
        "predict": ["predict", f"{MISSING}.jpg", "--onnx", f"{MISSING}.onnx"],
        "report": ["report", MISSING, "--out", out],
        "import-official": ["import-official", "teacher", f"{MISSING}.pth.tar", "--clip", "ViT-B-16",
                            "--pretrained", f"{MISSING}.pt", "--out", out],
        "demo": ["demo", "--config", f"{MISSING}.yaml", "--out", out],
        "toy": ["toy", "pretrain", "teacher", "--steps", "1", "--out", out],  # reads no user files
    }[command]


# An option of an int/float type per command, to give a value of the wrong type.
WRONG_TYPE = {
    "teacher": ["--epochs", "three"], "class-vectors": ["--chunk", "many"], "cache": ["--views", "x"],
    "distill": ["--lr", "fast"], "eval": ["--batch-size", "big"], "export": ["--opset", "new"],
    "predict": ["--topk", "all"], "report": None, "import-official": None, "demo": ["--seed", "lucky"],
    "toy": ["--steps", "many"],
}
NO_USER_FILES = {"toy"}
RUN_WITHOUT_ARGUMENTS = {"demo", "toy"}  # the demo runs, `toy` prints its help
ALL = sorted(WRONG_TYPE)


def _need(command: str) -> None:
    if command not in PRESENT:
        pytest.skip(f"`promptkd {command}` does not exist yet")


def _one_line(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0, err
    assert "Traceback" not in err
    assert err.startswith("promptkd"), err
    return err


@pytest.mark.parametrize("command", ALL)
def test_unknown_option(command, tmp_path, capsys):
    _need(command)
    argv = _argv(command, tmp_path) or [command, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--no-such-option"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-option" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ALL)
def test_missing_file(command, tmp_path, capsys):
    _need(command)
    argv = _argv(command, tmp_path)
    if command in NO_USER_FILES:
        pytest.skip(f"`promptkd {command}` reads no user files")
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "promptkd: error:" in err and "nonexistent" in err, err
    assert "not found" in err or "no such" in err.lower(), err


@pytest.mark.parametrize("command", ALL)
def test_missing_file_with_debug_raises(command, tmp_path):
    _need(command)
    argv = _argv(command, tmp_path)
    if command in NO_USER_FILES:
        pytest.skip(f"`promptkd {command}` reads no user files")
    with pytest.raises(Exception) as e:  # noqa: PT011 - each command has its own error type
        main(["--debug", *argv])
    assert "nonexistent" in str(e.value)


@pytest.mark.parametrize("command", ALL)
def test_wrong_type(command, tmp_path, capsys):
    _need(command)
    if WRONG_TYPE[command] is None:
        pytest.skip(f"`promptkd {command}` has no numeric option")
    argv = _argv(command, tmp_path) or [command, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main([*argv, *WRONG_TYPE[command]])
    assert e.value.code == 2
    assert "invalid" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_wrong_type_in_yaml_config(command, tmp_path, capsys):
    _need(command)
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: three\n")
    argv = [command, "--config", str(tmp_path / "bad.yaml"), "--dataset", f"folder:{MISSING}",
            "--out", str(tmp_path / "out")]
    if command == "distill":
        argv += ["--teacher", f"{MISSING}.safetensors"]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "epochs" in err and "three" in err, err


@pytest.mark.parametrize("value", ["--set train.lr=fast", "--set vision_depth=[1]", "--set gpa=maybe"])
def test_wrong_type_in_teacher_set(value, tmp_path, capsys):
    _need("teacher")
    flag, setting = value.split(" ")
    assert main(["teacher", flag, setting, "--dataset", f"folder:{MISSING}", "--out", str(tmp_path / "o")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert setting.split("=")[0].split(".")[-1] in err, err


def test_subcommand_without_arguments_and_bare_promptkd(capsys):
    for command in sorted(PRESENT - RUN_WITHOUT_ARGUMENTS):
        with pytest.raises(SystemExit) as e:
            main([command])
        assert e.value.code == 2, command
        _one_line(capsys.readouterr().err)
    assert main([]) == 2  # no command: the help, exit 2


def test_real_process_prints_exactly_one_line(tmp_path):
    """In a real process too (logging set up, warnings on): stderr is the one error line."""
    argv = [sys.executable, "-m", "promptkd.cli", *_argv("distill", tmp_path)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("promptkd: error:"), plain.stderr
