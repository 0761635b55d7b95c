"""A NaN/inf loss or gradient stops training with a message naming the step and keeps the last good
checkpoint; `--on-nonfinite skip` skips the batch instead (weights, optimiser and BatchNorm
statistics untouched). Also under data parallel, where every rank must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_helpers import tensors
from torch import nn

import promptkd.stages.distill as distill_mod
import promptkd.stages.teacher as teacher_mod
from promptkd.artifacts import load_artifact
from promptkd.cli import main
from promptkd.engine import TrainConfig, train_loop
from promptkd.errors import PromptKDError


def _nan_at(call: int, snapshot: dict | None = None, checkpoint: Path | None = None, grads_only: bool = False):
    """Wrap a loss: call number `call` is made non-finite (the loss itself, or only its gradients)."""

    def wrap(real):
        state = {"n": 0}

        def loss(*a, **k):
            value = real(*a, **k)
            state["n"] += 1
            if state["n"] != call:
                return value
            if snapshot is not None:  # what is on disk just before the bad step
                snapshot.update(tensors(checkpoint))
            first = value[0] if isinstance(value, tuple) else value
            if grads_only:  # finite value, NaN gradient: d sqrt(u)/du at u = 0 is inf, times du/dx = 0
                probe = a[0] if torch.is_tensor(a[0]) else first
                bad = first + (probe * 0).abs().sqrt().sum()
            else:
                bad = first * float("nan")
            return (bad, *value[1:]) if isinstance(value, tuple) else bad

        return loss

    return wrap


def test_distill_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch,
                                                                                   capsys):
    run = tmp_path / "run"
    before: dict = {}
    monkeypatch.setattr(distill_mod, "kd_loss", _nan_at(6, before, run / "checkpoint.safetensors")(distill_mod.kd_loss))
    code = main(world.distill_args(run, "--checkpoint-every", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "non-finite loss or gradients at epoch 2 step 2 (global step 6)" in err and "--on-nonfinite skip" in err
    ckpt, meta = load_artifact(run / "checkpoint.safetensors", kind="checkpoint")
    assert meta["steps"] == 5  # the step before the NaN
    assert set(ckpt) == set(before) and all(torch.equal(ckpt[k], before[k]) for k in ckpt)
    assert all(torch.isfinite(v).all() for k, v in ckpt.items() if v.is_floating_point())
    assert not (run / "student.safetensors").exists()


def test_distill_nan_gradients_are_skipped_with_the_option(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(distill_mod, "kd_loss", _nan_at(6, grads_only=True)(distill_mod.kd_loss))
    assert main(world.distill_args(run, "--on-nonfinite", "skip")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["skipped_steps"] == 1 and metrics["train"]["steps"] == 12
    assert metrics["history"][1]["skipped_steps"] == 1
    assert all(v == v for h in metrics["history"] for v in h.values() if isinstance(v, float))  # no NaN means
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("skipped")] == [6]
    student = tensors(run / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())
    # The projector's BatchNorm saw 11 batches: the skipped one left its statistics alone.
    assert int(student["projector.bn.num_batches_tracked"]) == 11


def test_teacher_nan_loss_stops_and_skip_option_finishes(world, tmp_path, monkeypatch, capsys):
    run = tmp_path / "stop"
    before: dict = {}
    real_call = teacher_mod.TeacherObjective.__call__
    monkeypatch.setattr(teacher_mod.TeacherObjective, "__call__",
                        _nan_at(3, before, run / "checkpoint.safetensors")(real_call))
    code = main(["-q", *world.teacher_train_args(run, "--checkpoint-every", "1")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "at epoch 1 step 3 (global step 3)" in err, err
    ckpt, meta = load_artifact(run / "checkpoint.safetensors", kind="checkpoint")
    assert meta["steps"] == 2 and all(torch.equal(ckpt[k], before[k]) for k in ckpt)

    monkeypatch.setattr(teacher_mod.TeacherObjective, "__call__", _nan_at(3)(real_call))
    run = tmp_path / "skip"
    assert main(["-q", *world.teacher_train_args(run, "--on-nonfinite", "skip")]) == 0
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert history[-1]["skipped_steps"] == 1
    prompts = tensors(run / "teacher.safetensors")
    assert all(torch.isfinite(v).all() for v in prompts.values())


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))


class _Data(torch.utils.data.Dataset):
    """16 samples; sample 5 holds an inf (a corrupt input)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        self.x[5, 0] = float("inf")

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def test_skipped_batch_leaves_batchnorm_statistics_alone(tmp_path):
    model = _WithBatchNorm()
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, warmup_epochs=0, on_nonfinite="skip", progress=False)
    res = train_loop(model, lambda b: (nn.functional.cross_entropy(model(b[0]), b[1]), {}), _Data(), cfg, tmp_path)
    assert res.skipped_steps == 1
    assert torch.isfinite(model.bn.running_mean).all() and torch.isfinite(model.bn.running_var).all()
    assert int(model.bn.num_batches_tracked) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_data_parallel_ranks_agree_on_a_nan_seen_by_one_rank(tmp_path):
    """Rank 1 alone sees a NaN: both ranks stop (no hang in the all-reduce), or both skip it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).with_name("ddp_nonfinite_worker.py")
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"r{rank}")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung: the ranks disagreed about a non-finite batch")
    assert all(p.returncode == 0 for p in procs), outs
    assert all("STOPPED at epoch 1 step 2" in out for out in outs), outs  # on_nonfinite="stop"
    assert all("SKIPPED 1" in out for out in outs), outs  # on_nonfinite="skip"
    params = [torch.load(tmp_path / f"r{rank}" / "skip" / "params.pt") for rank in range(2)]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


def test_bad_policy_name_is_refused():
    with pytest.raises(PromptKDError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="ignore")
