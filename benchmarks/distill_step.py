"""Seconds per distillation step for the official step design vs ours, on the paper's architectures.

Modes (all with an open_clip ViT-L-14 teacher and ViT-B-16 student, random weights, 224 px):
- official:  teacher text tower over all class prompts + teacher image tower + student fwd/bwd/step
- prestored: class vectors computed once; teacher image tower + student
- cached:    teacher features read from a cache; student only
- bound:     the student's forward+backward FLOPs divided by a matmul rate measured in this run

Each mode runs in its own subprocess so its peak memory (max RSS on CPU, max allocated on CUDA)
is its own. Usage:
    python benchmarks/distill_step.py --classes 100 --batch 8 --steps 3 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _models(args):
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student, Teacher

    torch.manual_seed(0)
    teacher = Teacher(load_clip(args.teacher), args.teacher_depth, args.teacher_depth, 4, 4).to(args.device).eval()
    student = Student(load_clip(args.student), teacher.dim, args.student_depth, 4).to(args.device)
    return teacher, student


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(args) -> dict:
    import torch.nn.functional as F

    from promptkd.engine.loop import autocast

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    teacher, student = _models(args)
    names = [f"class number {i}" for i in range(args.classes)]
    size = teacher.clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(args.batch, 3, size, size, device=device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    with torch.no_grad(), autocast(device, args.precision):
        class_vectors = teacher.encode_classnames(names).float()
        cached_feats = teacher.encode_images(x).float()

    def step():
        with autocast(device, args.precision):
            with torch.no_grad():
                w = teacher.encode_classnames(names).float() if args.mode == "official" else class_vectors
                t = teacher.encode_images(x).float() if args.mode != "cached" else cached_feats
                t_logits = 100.0 * t @ w.T
            s_logits = 100.0 * student(x).float() @ w.T
            loss = F.kl_div(F.log_softmax(s_logits, -1), F.softmax(t_logits, -1), reduction="sum") / s_logits.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    _sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(args.device)
    sec = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": args.mode, "s_per_step": sec, "images_per_s": args.batch / sec, "peak_mib": peak}


def run_bound(args) -> dict:
    """Student fwd+bwd FLOPs (counted) over a matmul rate measured now, on the same device."""
    from torch.utils.flop_counter import FlopCounterMode

    from promptkd.engine.loop import autocast

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    _, student = _models(args)
    size = student.clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(args.batch, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, args.precision):
        student(x).float().sum().backward()
    flops = counter.get_total_flops()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16 if args.precision == "fp16" else torch.float32
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(args.device)
    reps = 5 if device.type == "cpu" else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(args.device)
    rate = 2 * n**3 * reps / (time.perf_counter() - t0)
    sec = flops / rate
    return {"mode": "bound", "s_per_step": sec, "images_per_s": args.batch / sec, "peak_mib": float("nan"),
            "student_gflops_per_step": flops / 1e9, "matmul_gflops_per_s": rate / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--teacher", default="ViT-L-14")
    p.add_argument("--student", default="ViT-B-16")
    p.add_argument("--teacher-depth", type=int, default=9, help="teacher prompt depth (official: 9)")
    p.add_argument("--student-depth", type=int, default=9, help="student vision prompt depth (official: 9)")
    p.add_argument("--modes", default="official,prestored,cached,bound")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_bound(args) if args.mode == "bound" else run_mode(args)))
        return 0
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: {rows[-1]['s_per_step']:.3f} s/step", file=sys.stderr)
    ref = {r["mode"]: r["s_per_step"] for r in rows}
    print(f"\n{args.teacher} teacher, {args.student} student, {args.classes} classes, batch {args.batch}, "
          f"{args.device}, {args.precision}, torch {torch.__version__}\n")
    print("| mode | s/step | images/s | peak memory (MiB) | speed-up vs official |")
    print("|---|---|---|---|---|")
    for r in rows:
        speed = ref.get("official", float("nan")) / r["s_per_step"]
        print(f"| {r['mode']} | {r['s_per_step']:.3f} | {r['images_per_s']:.2f} | {r['peak_mib']:.0f} | {speed:.2f}x |")
    if "cached" in ref and "bound" in ref:
        print(f"\ncached / FLOP bound = {ref['cached'] / ref['bound']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
