"""The CLI: one-line errors with exit code 2, tracebacks only with --debug."""

import subprocess
import sys

import pytest

from promptkd.cli import main


def test_unknown_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["import-official", "teacher", "x.pth", "--teacher-model", "a", "--teacher-weights", "b", "--out", "c", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unrecognized arguments: --bogus" in err


def test_user_error_is_one_line_without_traceback(capsys, tmp_path):
    (tmp_path / "model.pth.tar").write_bytes(b"")
    code = main(["import-official", "teacher", str(tmp_path / "model.pth.tar"), "--teacher-model", "ViT-Q-99",
                 "--teacher-weights", "openai", "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "promptkd: error: unknown model 'ViT-Q-99': not an open_clip model name (see `open_clip.list_models()`) nor a .json config"


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "promptkd.cli", "--debug", "import-official", "student", "x",
                           "--student-model", "ViT-Q-99", "--student-weights", "openai", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "PromptKDError" in proc.stderr


def test_wrong_type_is_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["import-official", "nonsense", "x"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
