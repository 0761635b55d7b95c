"""Seconds per distillation step: the official step design against ours, on the paper's architectures.

Modes (open_clip ViT-L-14 teacher with depth-9 IVLP prompts, ViT-B-16 student with depth-9 vision
prompts and projector, random weights, 224 px); every mode ends with the student's forward,
backward and SGD step on the project's own `class_logits` / `kd_loss`:
- official:  under no_grad, the teacher text tower re-encodes all class prompts (tokenised once,
             as the official prompt learner keeps them), then the teacher image tower
- prestored: class vectors stored once; teacher image tower (only the vision tower is built)
- cached:    teacher features read from a teacher cache; no teacher module at all
- compiled:  the cached step as `promptkd distill` runs it on CUDA by default: the forward and loss
             through torch.compile (CUDA graphs on CUDA: promptkd.engine.loop.compile_loss), fused
             SGD there (foreach elsewhere), no host sync; compiling happens in the warm-up steps
- bound:     the student's forward+backward FLOPs (torch.utils.flop_counter) divided by the
             fp32/bf16/fp16 matmul rate measured in this run

Each mode runs in its own subprocess and builds only what its step needs, so its peak memory
(max RSS on CPU, max allocated on CUDA) is its own. Each also measures the matmul rate right after
its timed steps, which shows how much a shared machine slowed it. FLOPs per step are counted
during the (untimed) warm-up step. Usage:
    python benchmarks/distill_step.py --classes 100 --batch 8 --steps 2 --warmup 1 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


class Meter:
    """Timing fences and peak memory: CUDA/MPS counters on those devices, max RSS on CPU."""

    def __init__(self, device: torch.device):
        self.kind = device.type

    def sync(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()
        elif self.kind == "mps":
            torch.mps.synchronize()

    def reset_peak(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        if self.kind == "mps":
            return torch.mps.driver_allocated_memory() / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def flop_counter():
    """torch's FlopCounterMode, plus the CPU attention kernels it does not count by itself."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def sdpa(q_shape, k_shape, v_shape, *args, **kwargs):
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def sdpa_backward(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs):
        return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)

    def native_mha(q_shape, k_shape, v_shape, embed_dim, *args, **kwargs):  # eval-mode fast path, batch first
        b, n, e = q_shape
        return 2 * b * n * e * 3 * e + 4 * b * n * n * e + 2 * b * n * e * e

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward,
        aten._native_multi_head_attention: native_mha,
    })


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Clock:
    """Wall seconds, and CPU seconds of this process (all threads): on a shared machine the CPU
    time of a step varies far less than its wall time, so ratios of CPU times are steadier."""

    def __init__(self, meter: Meter):
        self.meter = meter

    def __enter__(self):
        self.meter.sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.meter.sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_rate(device: torch.device, precision: str, meter: Meter) -> tuple[float, float]:
    """FLOP per wall second and per CPU second of a square matmul in the run's precision: the best
    this device does right now."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=_dtype(precision))
    b = torch.randn(n, n, device=device, dtype=_dtype(precision))
    a @ b
    reps = 4 if device.type == "cpu" else 50
    with Clock(meter) as c:
        for _ in range(reps):
            a @ b
    return 2 * n**3 * reps / c.wall, 2 * n**3 * reps / c.cpu


def _image_size(visual) -> int:
    size = visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def _vision_only(name: str, depth: int):
    """The teacher's prompted image tower without its text tower (what a pre-stored run needs)."""
    from pathlib import Path

    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from promptkd.models.encoders import PromptedImageEncoder
    from promptkd.models.loading import _register_json_config, freeze

    key = _register_json_config(Path(name)) if name.endswith(".json") else name
    cfg = open_clip.get_model_config(key)
    visual = freeze(_build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"])))
    return PromptedImageEncoder(visual, depth, 4)


def _teacher_dim(name: str) -> int:
    from pathlib import Path

    import open_clip

    from promptkd.models.loading import _register_json_config

    key = _register_json_config(Path(name)) if name.endswith(".json") else name
    return int(open_clip.get_model_config(key)["embed_dim"])


def run_mode(args) -> dict:
    from promptkd.engine.loop import autocast
    from promptkd.kd import class_logits, kd_loss
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student, Teacher

    device, mode = torch.device(args.device), args.mode
    meter = Meter(device)
    torch.manual_seed(0)
    dim = _teacher_dim(args.teacher)
    student = Student(load_clip(args.student), dim, args.student_depth, 4).to(device).train()
    s_size = _image_size(student.clip.model.visual)
    x_s = torch.randn(args.batch, 3, s_size, s_size, device=device)
    W = F.normalize(torch.randn(args.classes, dim, device=device), dim=-1)
    t_feats = F.normalize(torch.randn(args.batch, dim, device=device), dim=-1)
    teacher = image_tower = tokens = None
    if mode == "official":
        teacher = Teacher(load_clip(args.teacher), args.teacher_depth, args.teacher_depth, 4, 4).to(device).eval()
        image_tower = teacher.image
        tokens = teacher.text.tokenize_classnames([f"class number {i}" for i in range(args.classes)]).to(device)
    elif mode == "prestored":
        image_tower = _vision_only(args.teacher, args.teacher_depth).to(device).eval()
    if image_tower is not None:
        t_size = _image_size(image_tower.visual)
        x_t = x_s if t_size == s_size else torch.randn(args.batch, 3, t_size, t_size, device=device)
    frozen = [n for n, p in student.named_parameters() if p.requires_grad and not n.startswith(("image.prompts", "projector"))]
    assert not frozen, f"frozen CLIP weights require grad: {frozen[:3]}"
    params = [p for p in student.parameters() if p.requires_grad]
    if mode == "compiled":
        from promptkd.engine.loop import TrainConfig, compile_loss, make_optimizer

        opt = make_optimizer(params, TrainConfig(lr=1e-3))
    else:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scale = torch.tensor(100.0, device=device)

    def forward_loss():
        with torch.no_grad():
            w = F.normalize(teacher.text.encode(tokens).float(), dim=-1) if mode == "official" else W
            t = F.normalize(image_tower(x_t).float(), dim=-1) if image_tower is not None else t_feats
            t_logits = class_logits(t, w, scale)
        return kd_loss(class_logits(student(x_s), w, student.logit_scale), t_logits, 1.0, 1000.0)

    graphs = mode == "compiled" and device.type == "cuda"
    loss_fn = compile_loss(forward_loss, device) if mode == "compiled" else forward_loss

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.precision):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    meter.reset_peak()
    counter = flop_counter()
    count = mode != "compiled"  # compiled graphs hide their ops from the counter: see the cached row
    warmup = max(args.warmup, 3) if mode == "compiled" else args.warmup  # compile, record the graphs, replay
    for i in range(warmup):
        with counter if i == 0 and count else contextlib.nullcontext():
            step()
    with Clock(meter) as c:
        for _ in range(args.steps):
            step()
    peak = meter.peak_mib()
    rate, cpu_rate = matmul_rate(device, args.precision, meter)
    flops = counter.get_total_flops() if args.warmup and count else float("nan")
    sec = c.wall / args.steps
    return {"mode": mode, "s_per_step": sec, "cpu_s_per_step": c.cpu / args.steps, "images_per_s": args.batch / sec,
            "peak_mib": peak, "gflops_per_step": flops / 1e9, "matmul_gflops_per_s": rate / 1e9,
            "matmul_gflops_per_cpu_s": cpu_rate / 1e9}


def run_bound(args) -> dict:
    """Student forward+backward FLOPs (counted) over a matmul rate measured now, on the same device."""
    from promptkd.engine.loop import autocast
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student

    device = torch.device(args.device)
    torch.manual_seed(0)
    student = Student(load_clip(args.student), _teacher_dim(args.teacher), args.student_depth, 4).to(device).train()
    size = _image_size(student.clip.model.visual)
    x = torch.randn(args.batch, 3, size, size, device=device)
    counter = flop_counter()
    with counter:
        with autocast(device, args.precision):
            out = student(x)
        out.float().sum().backward()
    flops = counter.get_total_flops()
    rate, cpu_rate = matmul_rate(device, args.precision, Meter(device))
    sec = flops / rate
    return {"mode": "bound", "s_per_step": sec, "cpu_s_per_step": flops / cpu_rate, "images_per_s": args.batch / sec,
            "peak_mib": float("nan"), "gflops_per_step": flops / 1e9, "matmul_gflops_per_s": rate / 1e9,
            "matmul_gflops_per_cpu_s": cpu_rate / 1e9}


def table(rows: list[dict], args) -> str:
    ref = {r["mode"]: r for r in rows}
    off = ref.get("official", {})
    lines = [f"{args.teacher} teacher, {args.student} student, {args.classes} classes, batch {args.batch}, "
             f"{args.device}, {args.precision}, torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| mode | s/step | images/s | peak memory (MiB) | GFLOP/step | speed-up vs official | CPU s/step | "
             "speed-up vs official, CPU time | matmul GFLOP/s (same process) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['s_per_step']:.3f} | {r['images_per_s']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['gflops_per_step']:.4g} | {off.get('s_per_step', float('nan')) / r['s_per_step']:.2f}x | "
            f"{r['cpu_s_per_step']:.3f} | {off.get('cpu_s_per_step', float('nan')) / r['cpu_s_per_step']:.2f}x | "
            f"{r['matmul_gflops_per_s']:.0f} |")
    if "compiled" in ref and "bound" in ref:
        c, b = ref["compiled"], ref["bound"]
        lines += ["", f"compiled / FLOP bound: {c['s_per_step'] / b['s_per_step']:.2f}x wall"
                      + (f"; compiled runs at {ref['cached']['s_per_step'] / c['s_per_step']:.2f}x the eager cached speed"
                         if "cached" in ref else "")]
    if "cached" in ref and "bound" in ref:
        c, b = ref["cached"], ref["bound"]
        # The same bound at the matmul rate measured inside the cached process, right after its steps.
        own = c["s_per_step"] * c["matmul_gflops_per_s"] / b["gflops_per_step"]
        own_cpu = c["cpu_s_per_step"] * c["matmul_gflops_per_cpu_s"] / b["gflops_per_step"]
        lines += ["", f"cached / FLOP bound: {c['s_per_step'] / b['s_per_step']:.2f}x wall, "
                      f"{c['cpu_s_per_step'] / b['cpu_s_per_step']:.2f}x CPU time; against the matmul rate measured "
                      f"in the cached process itself: {own:.2f}x wall, {own_cpu:.2f}x CPU time"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--teacher", default="ViT-L-14", help="open_clip name or model-config JSON")
    p.add_argument("--student", default="ViT-B-16")
    p.add_argument("--teacher-depth", type=int, default=9, help="teacher prompt depth (official: 9)")
    p.add_argument("--student-depth", type=int, default=9, help="student vision prompt depth (official: 9)")
    p.add_argument("--modes", default="official,prestored,cached,bound")
    p.add_argument("--in-process", action="store_true", help="run all modes here (peak memory is then shared)")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run_bound(args) if args.mode == "bound" else run_mode(args)))
        return 0
    rows = []
    for mode in args.modes.split(","):
        if args.in_process:
            rows.append(run_bound(args) if mode == "bound" else run_mode(argparse.Namespace(**{**vars(args), "mode": mode})))
        else:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: {rows[-1]['s_per_step']:.3f} s/step", file=sys.stderr)
    print("\n" + table(rows, args))
    if args.json:
        from promptkd.artifacts import write_json

        write_json(args.json, rows)  # atomic: a crash never leaves half a results file
    return 0


if __name__ == "__main__":
    sys.exit(main())
