"""The checkpoint's one resume check, and the engine's layout (functions that fit on a screen)."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from engine.engine_helpers import Noisy, ce_loss, make_model

from promptkd.engine import TrainConfig, train_loop
from promptkd.engine.checkpoint import read_header
from promptkd.engine.config import CHECKPOINT_NAME
from promptkd.errors import PromptKDError

ENGINE = Path(__file__).resolve().parents[2] / "src" / "promptkd" / "engine"


def test_resume_with_other_settings_is_refused_from_the_header_alone(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.05, progress=False)
    model = make_model()
    train_loop(model, ce_loss(model), Noisy(), cfg, tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    assert read_header(path, cfg)["epoch"] == 1
    other = replace(cfg, lr=0.1)
    with pytest.raises(PromptKDError, match=r"cannot resume: checkpoint was written with lr=0\.05, this run has lr=0\.1"):
        read_header(path, other)

    fresh = make_model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PromptKDError, match="written with lr=0.05"):  # the loop makes the same check
        train_loop(fresh, ce_loss(fresh), Noisy(), other, tmp_path, resume=True)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # refused before any load


def test_one_check_names_the_stage_setting_that_differs_and_shortens_long_values(tmp_path):
    """The stage's settings (in their header section, or at the top level) are checked with the engine's,
    in one message style; a setting the checkpoint never recorded (an older version's) is not compared."""
    from promptkd.artifacts import save_artifact

    cfg = TrainConfig(epochs=2, lr=0.05, progress=False)
    names = [f"class number {i}" for i in range(50)]
    path = save_artifact(tmp_path / CHECKPOINT_NAME, {"w": torch.zeros(1)}, {
        "kind": "checkpoint", "epoch": 1, "step": 0, "config": {"epochs": 2, "lr": 0.05},
        "teacher_config": {"mode": "promptsrc", "shots": 16}, "classnames": names})
    same = {"teacher_config": {"mode": "promptsrc", "shots": 16, "gpa_std": 9.0}, None: {"classnames": names}}
    assert read_header(path, cfg, same)["epoch"] == 1  # gpa_std: not in this checkpoint, not compared

    with pytest.raises(PromptKDError, match=r"cannot resume: checkpoint was written with mode='promptsrc', this run "
                                            r"has mode='ce' \(other settings differ too: lr\)$"):
        read_header(path, replace(cfg, lr=0.1), {**same, "teacher_config": {"mode": "ce", "shots": 16}})
    with pytest.raises(PromptKDError, match="cannot resume") as refused:
        read_header(path, cfg, {**same, None: {"classnames": names[:-1] + ["another class"]}})
    message = str(refused.value)
    assert "written with classnames=['class number 0', " in message and "..." in message
    assert len(message) - len(str(path)) < 250 < len(repr(names))  # fifty class names are not spelt out


def test_engine_functions_fit_on_a_screen():
    """The loop reads top to bottom: no function in engine/ is longer than 80 lines, train_loop well under."""
    lengths = {}
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert lengths["loop.py:train_loop"] <= 60
    assert {name: n for name, n in lengths.items() if n > 80} == {}
