"""benchmarks/distill_step.py on tiny configs: each mode runs the step it claims, in fp32 and in bf16
(the GPU precision path), and the CUDA-only timing/memory branches do what they should."""

import json

import pytest
import torch
from tinyclip import load_benchmark

from promptkd.models.encoders import PromptedTextEncoder


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("distill_step")


def _args(tiny_configs, *extra):
    t, s = tiny_configs
    return ["--teacher", str(t), "--student", str(s), "--teacher-depth", "2", "--student-depth", "2",
            "--classes", "6", "--batch", "2", "--steps", "2", "--warmup", "1", *extra]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_modes_run_the_step_they_claim(bench, tiny_configs, tmp_path, monkeypatch, capsys, precision):
    calls = {"text": 0, "sgd": 0}
    real_encode, real_step = PromptedTextEncoder.encode, torch.optim.SGD.step

    def encode(self, *a, **k):
        calls["text"] += 1
        return real_encode(self, *a, **k)

    def step(self, *a, **k):
        calls["sgd"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(PromptedTextEncoder, "encode", encode)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = tmp_path / "rows.json"
    assert bench.main(_args(tiny_configs, "--in-process", "--precision", precision, "--json", str(out))) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["official", "prestored", "cached", "bound"]
    assert calls == {"text": 3, "sgd": 9}  # official re-encodes the classes every step; every mode steps SGD
    flops = {m: r["gflops_per_step"] for m, r in rows.items()}
    assert flops["official"] > flops["prestored"] > flops["cached"] >= flops["bound"] > 0
    assert all(r["matmul_gflops_per_s"] > 0 and r["s_per_step"] > 0 for r in rows.values())
    table = capsys.readouterr().out
    assert "| official |" in table and "cached / FLOP bound" in table and precision in table


def test_bound_counts_no_weight_gradients(bench, tiny_configs):
    """Frozen CLIP weights get no gradient GEMMs: backward costs about one forward, not two."""
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student

    args = bench.main.__globals__["argparse"].Namespace(
        teacher=str(tiny_configs[0]), student=str(tiny_configs[1]), student_depth=2, batch=2, device="cpu",
        precision="fp32")
    bound = bench.run_bound(args)["gflops_per_step"]
    student = Student(load_clip(str(tiny_configs[1])), 32, 2, 2)
    with bench.flop_counter() as c:
        student.train()(torch.randn(2, 3, 32, 32))
    forward = c.get_total_flops() / 1e9
    assert 1.7 * forward < bound < 2.4 * forward  # attention backward is 2.5x its forward
    with bench.flop_counter() as c, torch.no_grad():  # eval-mode fast-path attention is counted too
        student.eval()(torch.randn(2, 3, 32, 32))
    assert c.get_total_flops() / 1e9 == pytest.approx(forward, rel=1e-3)


def test_cuda_meter_branch(bench, monkeypatch):
    """The CUDA branch (not runnable here) syncs, resets and reads the CUDA peak counter."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)
    meter = bench.Meter(torch.device("cuda"))
    meter.reset_peak()
    meter.sync()
    assert meter.peak_mib() == 3.0 and log == ["reset", "sync"]
    cpu = bench.Meter(torch.device("cpu"))
    cpu.sync()
    assert log == ["reset", "sync"] and cpu.peak_mib() > 10  # max RSS of this process, in MiB
