"""Where the tests run: every test not marked `gpu` sees no accelerator (tests/conftest.py), and the
CUDA paths that matter have tests marked `gpu` that run when a CUDA device is visible.

Each gpu test is parametrized over ["cpu", "cuda"]: the CPU case runs everywhere and keeps the test
itself honest; the CUDA case is skipped without a device. Run them alone with `pytest -m gpu`.
"""

import json
import os

import pytest
import torch
from tinyclip import killed_at_call, write_images

import promptkd.stages.distill as distill_mod
from promptkd.engine import TrainConfig
from promptkd.engine.loop import resolve_device, resolve_precision
from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_tests_not_marked_gpu_see_only_the_cpu():
    assert not torch.cuda.is_available()
    assert resolve_device("auto") == torch.device("cpu")  # TrainConfig's and the CLI's default device
    assert resolve_precision("auto", resolve_device("auto")) == "fp32"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # processes the test starts see no GPU either
    assert TrainConfig().device == "auto"  # why the pinning is needed


@pytest.fixture
def kd(tiny_configs, tmp_path):
    """Eight tiny PNGs of four classes, the student CLIP's (config, weights file), and a maker of
    (teacher, student, class vectors) on a device."""
    from reliability.reliability_helpers import clip_weights

    items, names = write_images(tmp_path / "images", per_class=2)
    student_clip = (str(tiny_configs[1]), str(clip_weights(tiny_configs[1], tmp_path / "student-clip.safetensors", 0)))

    def make(device):
        torch.manual_seed(0)  # the same models every call
        teacher = Teacher(load_clip(str(tiny_configs[0]), device=device), 2, 2, 2, 2).eval().to(device)
        torch.manual_seed(1)
        student = Student(load_clip(*student_clip, device=device), teacher.dim, 2, 2).to(device)
        with torch.no_grad():
            cv = ClassVectors(teacher.encode_classnames(names).detach(), names, teacher.identity())
        return teacher, student, cv

    return items, student_clip, make


def _steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_distillation_keeps_fp32_master_weights_and_tracks_fp32(device, kd, tmp_path):
    items, _, make = kd
    first_loss, trained = {}, {}
    for precision in ("fp32", "bf16"):
        teacher, student, cv = make(device)
        init = {k: v.detach().clone() for k, v in student.trainable_tensors().items()}
        linear = next(m for n, m in student.image.named_modules() if n.endswith("mlp.c_fc"))  # a block's MLP
        dtypes = set()
        linear.register_forward_hook(lambda m, i, out, seen=dtypes: seen.add(out.dtype))
        cfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_epochs=0, precision=precision, progress=False,
                          device=device)
        distill_mod.distill_models(teacher, student, cv, items, tmp_path / precision, train=cfg, kd_weight=100.0)
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}  # autocast was on (or off)
        params = [p for p in student.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.device.type == device for p in params)
        assert all(torch.isfinite(p).all() for p in params)
        now = student.trainable_tensors()
        assert any(not torch.equal(now[k], init[k]) for k in init)  # it trained
        steps = _steps(tmp_path / precision)
        assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        first_loss[precision] = steps[0]["loss"]
        trained[precision] = now
    # The first step sees the same weights and batch: bf16 autocast changes the loss only by rounding.
    assert first_loss["bf16"] == pytest.approx(first_loss["fp32"], rel=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_on_the_device_continues_the_run(device, kd, tmp_path):
    items, _, make = kd
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0, checkpoint_every=1, progress=False,
                      device=device)
    teacher, ref, cv = make(device)
    distill_mod.distill_models(teacher, ref, cv, items, tmp_path / "ref", val_items=items, train=cfg)

    teacher, student, cv = make(device)
    with killed_at_call(distill_mod, "kd_loss", 4):  # epoch 2, step 2 (2 steps per epoch)
        distill_mod.distill_models(teacher, student, cv, items, tmp_path / "run", val_items=items, train=cfg)
    teacher, resumed, cv = make(device)
    with torch.no_grad():  # the trained state must come from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(1.0)
    distill_mod.distill_models(teacher, resumed, cv, items, tmp_path / "run", val_items=items, train=cfg,
                               resume=True)
    a, b = ref.trainable_tensors(), resumed.trainable_tensors()
    for k in a:
        assert b[k].device.type == device, k
        if device == "cpu":
            assert torch.equal(a[k], b[k]), k
        else:  # CUDA kernels (attention backward) may sum in another order from run to run
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert [r["step"] for r in _steps(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_export_of_a_device_trained_student_matches_it(device, kd, tmp_path):
    pytest.importorskip("onnxruntime")
    from promptkd.deploy import OnnxClassifier, StudentClassifier
    from promptkd.stages.export import export_onnx

    items, student_clip, make = kd
    teacher, student, cv = make(device)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.05, warmup_epochs=0, progress=False, device=device)
    res = distill_mod.distill_models(teacher, student, cv, items, tmp_path / "run", train=cfg, kd_weight=100.0)

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # The trained student, still on its device; fp32 (not TF32) convolutions, comparable to the CPU.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        on_device = StudentClassifier(student, cv).logits(x).cpu()
    cv_file = cv.save(tmp_path / "run" / "cv.safetensors")
    loaded = StudentClassifier.load(res.student_path, cv_file, clip=load_clip(*student_clip))
    onnx_path = export_onnx(loaded, tmp_path / "student.onnx")
    with torch.no_grad():
        on_cpu = loaded.logits(x)
    from_onnx = OnnxClassifier.load(onnx_path).logits(x)
    torch.testing.assert_close(from_onnx, on_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(on_cpu, on_device, rtol=1e-4, atol=1e-4)
    assert isinstance(ClassVectors.load(cv_file), ClassVectors) and isinstance(loaded.student, Student)
