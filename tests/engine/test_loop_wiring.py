"""What the training loop does with its settings, checked from the outside: the learning rate of every
step (logged and really used by SGD) is the official warm-up + cosine value of its epoch, also after
a mid-epoch resume; fp16 runs under autocast with a GradScaler that unscales before the update and
skips a step whose fp16 gradients overflow.

Expected values come from hand formulas here, never from promptkd.engine.lr_at_epoch.
"""

import json
import math

import pytest
import torch
from torch import nn

from promptkd.artifacts import load_artifact
from promptkd.engine import TrainConfig, train_loop

STEPS_PER_EPOCH = 4


def official_lr(epoch: int, lr: float, warmup_lr: float, warmup_epochs: int, epochs: int) -> float:
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs)) with WARMUP_RECOUNT, stepped once
    per epoch (official-promptkd.md §2.6): warm-up epochs run at the constant warmup_lr, then the
    cosine restarts its count at 0."""
    if epoch < warmup_epochs:
        return warmup_lr
    t = epoch - warmup_epochs
    return lr / 2 * (1 + math.cos(math.pi * t / epochs))


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 2 * STEPS_PER_EPOCH

    def __getitem__(self, i):
        return torch.zeros(1), 0, i


GRAD = torch.tensor([1.0, -2.0, 0.5])  # d loss / d w, the same at every step


class Probe(nn.Module):
    """loss = w . GRAD: plain SGD (no momentum, no weight decay) moves w by exactly -lr * GRAD."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


def _cfg(warmup_epochs: int, **kw) -> TrainConfig:
    return TrainConfig(epochs=4, batch_size=2, lr=0.1, warmup_lr=0.002, warmup_epochs=warmup_epochs, momentum=0.0,
                       weight_decay=0.0, progress=False, **kw)


def _run(cfg, out, resume=False, die_at_call=None):
    """Train a Probe; returns (w before each step, then the final w) as float64 rows."""
    model = Probe()
    seen = []

    def loss_fn(batch):
        if die_at_call is not None and len(seen) + 1 == die_at_call:
            raise KeyboardInterrupt  # killed inside this step
        seen.append(model.w.detach().clone())
        return (model.w * GRAD).sum() + 0 * batch[0].sum(), {}

    train_loop(model, loss_fn, Indices(), cfg, out, resume=resume)
    return torch.stack([*seen, model.w.detach().clone()]).double()


def _used_lrs(ws: torch.Tensor) -> list[float]:
    """The lr SGD applied at each step, read back from the update: w' = w - lr * GRAD."""
    lrs = -(ws[1:] - ws[:-1]) / GRAD.double()
    assert torch.allclose(lrs, lrs[:, :1].expand_as(lrs), rtol=1e-4)  # one lr for every coordinate
    return lrs[:, 0].tolist()


@pytest.mark.parametrize("warmup_epochs", [1, 2])
def test_each_step_runs_at_the_official_lr_of_its_epoch(tmp_path, warmup_epochs):
    cfg = _cfg(warmup_epochs)
    want = [official_lr(e, 0.1, 0.002, warmup_epochs, 4) for e in range(4)]
    assert len(set(want)) == 4 - (warmup_epochs - 1)  # the warm-up and every cosine epoch differ

    used = _used_lrs(_run(cfg, tmp_path / "run"))
    assert used == pytest.approx([want[s // STEPS_PER_EPOCH] for s in range(16)], rel=1e-4)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    for r in steps:
        assert r["epoch"] == (r["step"] - 1) // STEPS_PER_EPOCH
        assert r["lr"] == pytest.approx(want[r["epoch"]], rel=1e-12), r
    assert [r["lr"] for r in records if r["event"] == "epoch"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("warmup_epochs", [1, 2])
def test_a_resumed_run_steps_at_the_lr_of_its_epoch(tmp_path, warmup_epochs):
    cfg = _cfg(warmup_epochs, checkpoint_every=1)
    want = [official_lr(e, 0.1, 0.002, warmup_epochs, 4) for e in range(4)]
    ref = _run(cfg, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 3, step 2 (global step 10)
        _run(cfg, tmp_path / "run", die_at_call=10)
    _, meta = load_artifact(tmp_path / "run" / "checkpoint.safetensors", kind="checkpoint")
    assert (meta["epoch"], meta["step"], meta["steps"]) == (2, 1, 9)

    resumed = _run(cfg, tmp_path / "run", resume=True)  # w before steps 10..16, then the final w
    assert torch.equal(resumed[0], ref[9]) and torch.equal(resumed[-1], ref[-1])
    assert _used_lrs(resumed) == pytest.approx([want[s // STEPS_PER_EPOCH] for s in range(9, 16)], rel=1e-4)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert [r["lr"] for r in steps] == pytest.approx([want[s // STEPS_PER_EPOCH] for s in range(16)], rel=1e-12)


# ---------------------------------------------------------------------------------------------- fp16


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def _fp16_step(tmp_path, x, y, lr=0.5):
    """One fp16 step (batch = the whole set) of a linear classifier; returns (before, after, logits dtype, meta)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    dtypes = []

    def loss_fn(batch):
        logits = model(batch[0])
        dtypes.append(logits.dtype)
        return nn.functional.cross_entropy(logits, batch[1]), {}

    cfg = TrainConfig(epochs=1, batch_size=len(x), lr=lr, warmup_epochs=0, momentum=0.0, weight_decay=0.0,
                      precision="fp16", progress=False)
    train_loop(model, loss_fn, Rows(x, y), cfg, tmp_path)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    _, meta = load_artifact(tmp_path / "checkpoint.safetensors", kind="checkpoint")
    return before, after, dtypes, meta


def test_fp16_step_is_unscaled_sgd_on_the_fp32_master_weights(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = 0.1 * torch.rand(4, 4, generator=g) - 0.05  # small inputs: the scaled fp16 gradients stay finite
    y = torch.tensor([0, 1, 2, 0])
    before, after, dtypes, meta = _fp16_step(tmp_path, x, y)
    assert dtypes == [torch.float16]  # the forward ran under fp16 autocast
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay fp32

    # Hand gradient of mean cross-entropy for logits = x W^T + b, in float64.
    W, b = before["weight"].double(), before["bias"].double()
    p = torch.softmax(x.double() @ W.T + b, dim=1)
    G = (p - torch.eye(3, dtype=torch.float64)[y]) / len(x)
    want = {"weight": -0.5 * G.T @ x.double(), "bias": -0.5 * G.sum(0)}
    for k, delta in want.items():
        got = after[k].double() - before[k].double()
        assert (got - delta).abs().max() <= 0.02 * delta.abs().max(), k  # fp16 forward/backward precision
    assert meta["scaler"]["scale"] == 65536.0  # the GradScaler was on and did not overflow


def test_fp16_overflowing_gradients_skip_the_step_and_halve_the_scale(tmp_path):
    x = torch.full((4, 4), 100.0)  # 65536 x the weight gradient overflows fp16, the loss does not
    x[:, 1] = -100.0
    y = torch.tensor([0, 1, 2, 0])
    before, after, _, meta = _fp16_step(tmp_path, x, y)
    for k in before:
        assert torch.equal(before[k], after[k]), k  # the scaler skipped the update
    assert meta["scaler"]["scale"] == 32768.0
