"""The shared training loop: official schedule, exact resume, non-finite handling."""

import math

import pytest
import torch
from engine.engine_helpers import Noisy, ce_loss, make_model

from promptkd.engine import TrainConfig, lr_at_epoch, train_loop
from promptkd.errors import PromptKDError


def test_official_schedule():
    cfg = TrainConfig()
    assert lr_at_epoch(0, cfg) == 1e-5
    assert lr_at_epoch(1, cfg) == pytest.approx(0.005)
    assert lr_at_epoch(19, cfg) == pytest.approx(0.0025 * (1 + math.cos(math.pi * 18 / 20)))
    assert lr_at_epoch(19, cfg) == pytest.approx(1.22e-4, rel=0.01)


def test_training_reduces_loss_and_only_touches_trainable(tmp_path):
    model = make_model()
    frozen = model[0].weight.clone()
    cfg = TrainConfig(epochs=6, batch_size=4, lr=0.1, warmup_epochs=0, progress=False)
    res = train_loop(model, ce_loss(model), Noisy(), cfg, tmp_path)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert torch.equal(model[0].weight, frozen)
    assert (tmp_path / "metrics.jsonl").read_text().count('"event": "epoch"') == 6


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.05, checkpoint_every=2, progress=False)
    ref = make_model()
    train_loop(ref, ce_loss(ref), Noisy(), cfg, tmp_path / "ref")

    model = make_model()
    calls = {"n": 0}
    inner = ce_loss(model)

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2, step 3: after the mid-epoch checkpoint at step 2
            raise KeyboardInterrupt
        return inner(batch)

    with pytest.raises(KeyboardInterrupt):
        train_loop(model, crashing, Noisy(), cfg, tmp_path / "run")
    fresh = make_model()
    res = train_loop(fresh, ce_loss(fresh), Noisy(), cfg, tmp_path / "run", resume=True)
    for (n, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert len(res.history) == 3


def test_non_finite_loss_stops_with_step_or_skips(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False)
    model = make_model()
    inner = ce_loss(model)
    state = {"n": 0}

    def sometimes_nan(batch):
        state["n"] += 1
        loss, logs = inner(batch)
        return (loss * float("nan"), logs) if state["n"] == 3 else (loss, logs)

    with pytest.raises(PromptKDError, match="step 3"):
        train_loop(model, sometimes_nan, Noisy(), cfg, tmp_path / "a")
    state["n"] = 0
    cfg_skip = TrainConfig(epochs=1, batch_size=4, progress=False, on_nonfinite="skip")
    res = train_loop(model, sometimes_nan, Noisy(), cfg_skip, tmp_path / "b")
    assert res.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())
