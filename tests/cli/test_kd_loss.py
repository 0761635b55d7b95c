"""`--kd-loss sym-kl` end to end: a distillation with KDPL's symmetric KL runs on tiny CLIPs from
the command line, records its loss, and learns something else than the default KL run."""

from __future__ import annotations

import json

import torch
from cli_helpers import distill_command
from safetensors.torch import load_file
from tinyclip import one_line

from promptkd.artifacts import read_artifact_meta
from promptkd.cli import main


def test_distill_with_symmetric_kl_runs_and_is_recorded(clips, data, runs, tmp_path, capsys):
    out = tmp_path / "sym"
    assert main(distill_command(clips, data, runs.teacher, out, "--kd-loss", "sym-kl")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kd_loss"] == "sym-kl" and metrics["config"]["kd_loss"] == "sym-kl"
    assert read_artifact_meta(out / "student.safetensors", "student")["kd"]["kd_loss"] == "sym-kl"
    assert json.loads((runs.student / "metrics.json").read_text())["kd_loss"] == "kl"  # the default
    # the same command, seed and data with the default loss: only the loss differs, so the prompts do
    sym, kl = load_file(str(out / "student.safetensors")), load_file(str(runs.student / "student.safetensors"))
    assert sym.keys() == kl.keys()
    assert any(not torch.equal(sym[k], kl[k]) for k in sym)
    assert all(torch.isfinite(v).all() for v in sym.values())


def test_an_unknown_kd_loss_is_one_line(clips, data, runs, tmp_path, capsys):
    code = main(distill_command(clips, data, runs.teacher, tmp_path / "bad", "--set", "kd_loss=js"))
    err = capsys.readouterr().err
    assert code == 2 and "kd_loss must be one of kl, sym-kl" in one_line(err)
    assert not (tmp_path / "bad" / "student.safetensors").exists()
