"""Inference speed: teacher image tower vs distilled student, in PyTorch and ONNX Runtime.

Both sides are complete classifiers (image -> logits against class vectors), so the numbers are
what a deployment sees: the teacher's prompted image tower, and the student's prompted tower plus
projector. Weights do not change speed, so the paper architectures use random weights (no
downloads). Results go to stdout as a markdown table (and --json).

    python benchmarks/inference.py                       # toy + paper, defaults below
    python benchmarks/inference.py --suites toy --iters 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.deploy import StudentClassifier
from promptkd.errors import PromptKDError
from promptkd.models import PromptedImageEncoder, load_clip
from promptkd.models.wrappers import ClassVectors, Student
from promptkd.stages.export import onnx_bytes

# suite -> (teacher model, student model, vision prompt depth, prompt length)
SUITES = {"toy": ("toy-teacher", "toy-student", 9, 4), "paper": ("ViT-L-14", "ViT-B-16", 9, 4)}


class TeacherClassifier(nn.Module):
    """The teacher's prompted image tower -> logits against class vectors (what a teacher deploys)."""

    def __init__(self, image: PromptedImageEncoder, class_vectors: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.image = image.eval()
        self.register_buffer("class_vectors", class_vectors)
        self.register_buffer("logit_scale", logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(self.image(images), dim=-1) @ self.class_vectors.T


def _clip(name: str, notes: list[str]):
    if not name.startswith("toy-"):
        return load_clip(name, None)
    try:
        return load_clip(name)
    except PromptKDError as e:  # toy weights not built yet: same architecture, same speed
        notes.append(f"{name}: random weights ({e})")
        return load_clip(name, "none")


def build(suite: str, n_classes: int, notes: list[str]) -> tuple[dict[str, nn.Module], int]:
    t_name, s_name, depth, n_ctx = SUITES[suite]
    t_clip, s_clip = _clip(t_name, notes), _clip(s_name, notes)
    t_dim = t_clip.embed_dim
    vectors = F.normalize(torch.randn(n_classes, t_dim), dim=-1)
    t_depth = min(depth, len(t_clip.model.visual.transformer.resblocks))
    s_depth = min(depth, len(s_clip.model.visual.transformer.resblocks))
    teacher = TeacherClassifier(PromptedImageEncoder(t_clip.model.visual, t_depth, n_ctx), vectors,
                                t_clip.model.logit_scale.detach().exp())
    student = StudentClassifier(Student(s_clip, t_dim, s_depth, n_ctx),
                                ClassVectors(vectors, [f"c{i}" for i in range(n_classes)], {}))
    size = student.image_size
    return {f"teacher {t_name}": teacher.eval(), f"student {s_name}": student.eval()}, size


def n_params(m: nn.Module) -> float:
    inner = m.image if isinstance(m, TeacherClassifier) else nn.ModuleList([m.student.image, m.student.projector])
    return sum(p.numel() for p in inner.parameters()) / 1e6


def timed(fn, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def runners(model: nn.Module, size: int, backends: list[str], threads: int):
    if "torch" in backends:
        def run_torch(x):
            with torch.inference_mode():
                return model(x)
        yield "PyTorch", run_torch
    if "onnx" in backends:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(onnx_bytes(model, size), opts, providers=["CPUExecutionProvider"])
        yield "ONNX Runtime", lambda x: session.run(None, {"image": x.numpy()})[0]
        del session


def bench_suite(suite: str, args, notes: list[str]) -> list[dict]:
    models, size = build(suite, args.classes, notes)
    paper = suite == "paper"
    warmup, iters = (args.paper_warmup, args.paper_iters) if paper else (args.warmup, args.iters)
    batch = args.paper_batch if paper else args.batch
    tp_iters = max(1, iters // 10) if not paper else args.paper_batch_iters
    rows = []
    for name, model in models.items():
        for backend, fn in runners(model, size, args.backends, args.threads):
            lat = timed(fn, torch.randn(1, 3, size, size), warmup, iters)
            # paper: no extra warm-up at batch B (the batch-1 calls warmed up; one ViT-L batch takes a minute)
            tp = timed(fn, torch.randn(batch, 3, size, size), 0 if paper else 1, tp_iters)
            rows.append({"suite": suite, "model": name, "params_M": round(n_params(model), 2), "image_size": size,
                         "backend": backend, "latency_ms_b1": round(1e3 * statistics.median(lat), 2),
                         "batch": batch, "images_per_s": float(f"{batch * len(tp) / sum(tp):.3g}")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| suite | model | params (M) | px | backend | batch-1 latency (ms) | throughput (img/s) @ batch |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['model']} | {r['params_M']} | {r['image_size']} | {r['backend']} | "
                     f"{r['latency_ms_b1']} | {r['images_per_s']} @ {r['batch']} |")
    speed = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            t = [r for r in rows if r["suite"] == suite and r["backend"] == backend and r["model"].startswith("t")]
            s = [r for r in rows if r["suite"] == suite and r["backend"] == backend and r["model"].startswith("s")]
            if t and s:
                speed.append(f"{suite}/{backend}: student {t[0]['latency_ms_b1'] / s[0]['latency_ms_b1']:.1f}x faster "
                             f"at batch 1, {s[0]['images_per_s'] / t[0]['images_per_s']:.1f}x the throughput")
    return "\n".join(lines + [""] + [f"- {x}" for x in speed])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=["toy", "paper"])
    p.add_argument("--backends", nargs="+", choices=["torch", "onnx"], default=["torch", "onnx"])
    p.add_argument("--classes", type=int, default=100, help="number of class vectors (default 100)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, both backends")
    p.add_argument("--iters", type=int, default=50, help="toy: timed batch-1 calls (throughput: iters/10 batches)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="toy throughput batch")
    p.add_argument("--paper-iters", type=int, default=3, help="paper: timed batch-1 calls")
    p.add_argument("--paper-warmup", type=int, default=1)
    p.add_argument("--paper-batch", type=int, default=32, help="paper throughput batch")
    p.add_argument("--paper-batch-iters", type=int, default=1, help="paper: timed throughput batches (no warm-up batch)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    notes: list[str] = []
    rows = [r for suite in args.suites for r in bench_suite(suite, args, notes)]
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{args.classes} classes\n")
    print(markdown(rows))
    for n in notes:
        print(f"\nnote: {n}")
    if args.json:
        from promptkd.artifacts import write_json

        write_json(args.json, {"rows": rows, "notes": notes, "torch": torch.__version__})  # atomic
    return 0


if __name__ == "__main__":
    sys.exit(main())
