"""The loop's fast path: no host sync inside a step (results read back every SYNC_EVERY steps), a
late-found NaN still stops naming its step with nothing logged or checkpointed past it, and the
same training as the per-step path; compile options resolve as documented."""

import json

import pytest
import torch
from engine.engine_helpers import Noisy, ce_loss, make_model
from torch import nn

import promptkd.engine.loop as loop
from promptkd.engine import TrainConfig, train_loop
from promptkd.errors import PromptKDError

CFG = dict(epochs=1, batch_size=3, lr=0.1, warmup_epochs=0, progress=False)  # 8 steps over Noisy()


def test_steps_do_not_wait_for_the_host(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SYNC_EVERY", 4)
    reads = {"scalar": 0, "flush": 0}
    real_tolist = torch.Tensor.tolist
    model = make_model()
    inner = ce_loss(model)
    in_step = {"on": False}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if in_step["on"]:
                reads["scalar"] += 1
            return real(self, *a, **k)
        return read

    for name in ("item", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def tolist(self):
        reads["flush"] += in_step["on"]
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def loss_fn(batch):  # a step is from the loss on; the loop's reads are counted until the next loss
        in_step["on"] = True
        return inner(batch)

    train_loop(model, loss_fn, Noisy(), TrainConfig(**CFG), tmp_path)
    assert reads["scalar"] == 0  # no .item(), bool() or float() of a device value in 8 steps
    assert reads["flush"] == 2  # steps 1-4 and 5-8 read back once each
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "step"] == list(range(1, 9))


def test_fast_path_trains_like_the_per_step_path(tmp_path):
    fast, slow = make_model(), make_model()
    train_loop(fast, ce_loss(fast), Noisy(), TrainConfig(**CFG), tmp_path / "fast")
    # fp16 autocast takes the per-step path (its GradScaler checks every step); here in fp32 with skip
    train_loop(slow, ce_loss(slow), Noisy(), TrainConfig(**CFG, on_nonfinite="skip"), tmp_path / "slow")
    for a, b in zip(fast.state_dict().values(), slow.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"event": "step"' in line] for d in ("fast", "slow")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-6) and len(logs[0]) == 8


def test_late_found_nan_stops_at_its_step_and_rolls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SYNC_EVERY", 4)
    model = make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    inner, calls = ce_loss(model), {"n": 0}

    def nan_at_3(batch):
        calls["n"] += 1
        loss, logs = inner(batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    with pytest.raises(PromptKDError, match=r"epoch 1 step 3 \(global step 3\); stopped"):
        train_loop(model, nan_at_3, Noisy(), TrainConfig(**CFG), tmp_path)
    assert calls["n"] == 4  # found when steps 1-4 were read back
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # nothing from the NaN step on
    for k, v in model.state_dict().items():  # no checkpoint yet: back to the start, finite
        assert torch.equal(v, start[k]), k


def test_nonfinite_stop_without_a_checkpoint_does_not_claim_one(tmp_path):
    """A NaN at the very first step: the message says no checkpoint was written (none exists)."""

    class Data:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2), 0, i

    model = torch.nn.Linear(2, 1)
    with pytest.raises(PromptKDError, match="No checkpoint was written yet") as e:
        train_loop(model, lambda b: (model(b[0]).sum() * float("nan"), {}), Data(), TrainConfig(epochs=1, batch_size=2,
                   progress=False), tmp_path)
    assert "kept at" not in str(e.value) and not (tmp_path / "checkpoint.safetensors").exists()


def test_compile_option_resolves_and_is_checked():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loop.resolve_compile(TrainConfig(), cuda, True, False)
    assert not loop.resolve_compile(TrainConfig(), cuda, False, False)  # the caller did not vouch for its step
    assert not loop.resolve_compile(TrainConfig(), cuda, True, True)  # data parallel: off unless asked
    assert not loop.resolve_compile(TrainConfig(), cpu, True, False)
    assert loop.resolve_compile(TrainConfig(compile="on"), cpu, False, True)
    assert not loop.resolve_compile(TrainConfig(compile="off"), cuda, True, False)
    with pytest.raises(PromptKDError, match="compile"):
        TrainConfig(compile="yes")
    assert TrainConfig(compile=True).compile == "on" and TrainConfig(compile=False).compile == "off"  # YAML on/off


def test_sgd_is_fused_on_cuda_and_foreach_elsewhere(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.optim, "SGD", lambda params, **kw: seen.update(kw))
    p = nn.Parameter(torch.zeros(2))
    loop.make_optimizer([p], TrainConfig())
    assert seen.get("foreach") is True and "fused" not in seen
    fake = nn.Parameter(torch.zeros(2))
    monkeypatch.setattr(type(fake), "device", property(lambda self: torch.device("cuda")), raising=False)
    seen.clear()
    loop.make_optimizer([fake], TrainConfig())
    assert seen.get("fused") is True


class _CompilerError(Exception):
    """Stands for what a broken toolchain raises (no Triton, no C compiler) when the step compiles."""


def _failing_backward(x):
    class Fail(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):  # the backward graph is compiled lazily, at the first backward
            raise _CompilerError("inductor: C compiler not found")

    return Fail.apply(x)


def _compile_run(tmp_path, monkeypatch, mode, compiler):
    """Train with the step 'compiled' by `compiler(loss_fn)` (resolve_compile forced on); returns the model."""
    monkeypatch.setattr(loop, "resolve_compile", lambda cfg, *a: cfg.compile != "off")
    monkeypatch.setattr(loop, "compile_loss", lambda fn, device: compiler(fn))
    model = make_model()
    train_loop(model, ce_loss(model), Noisy(), TrainConfig(**CFG, compile=mode), tmp_path / mode)
    return model


def _eager(tmp_path):
    model = make_model()
    train_loop(model, ce_loss(model), Noisy(), TrainConfig(**CFG, compile="off"), tmp_path / "eager")
    return model.state_dict()


def test_a_step_that_fails_to_compile_trains_eagerly_under_auto(tmp_path, monkeypatch, caplog):
    calls = {"n": 0}

    def compiler(fn):
        def broken(batch):  # runs the forward (BatchNorm statistics move), then fails in the backward
            calls["n"] += 1
            loss, logs = fn(batch)
            return _failing_backward(loss), logs
        return broken

    with caplog.at_level("WARNING", logger="promptkd"):
        model = _compile_run(tmp_path, monkeypatch, "auto", compiler)
    assert calls["n"] == 1  # tried once, then eager for every step
    assert [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()] == [
        "torch.compile failed on the training step (_CompilerError: inductor: C compiler not found); "
        "training without it (--compile off skips the attempt)"]
    eager = _eager(tmp_path)
    for k, v in model.state_dict().items():  # the failed attempt left nothing behind (running stats included)
        assert torch.equal(v, eager[k]), k


def test_a_step_that_fails_to_compile_is_one_line_under_on(tmp_path, monkeypatch):
    def compiler(fn):
        def broken(batch):
            raise _CompilerError("BackendCompilerFailed: triton not found\n  long compiler log")
        return broken

    with pytest.raises(PromptKDError, match=r"^torch.compile failed on the training step \(_CompilerError: "
                                            r"BackendCompilerFailed: triton not found\); run with --compile off"):
        _compile_run(tmp_path, monkeypatch, "on", compiler)


def test_the_compile_attempt_leaves_no_trace(tmp_path, monkeypatch):
    calls = {"n": 0}

    def compiler(fn):  # a compiler that works: the attempt runs the step once more, then undoes it
        def compiled(batch):
            calls["n"] += 1
            return fn(batch)
        return compiled

    model = _compile_run(tmp_path, monkeypatch, "auto", compiler)
    assert calls["n"] == 8 + 1  # 8 steps and the attempt
    eager = _eager(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, eager[k]), k
