"""Peak memory of one teacher training step, with and without class-chunked text (--text-chunk).

Each setting runs in its own subprocess so that peaks do not mix. On CUDA the number is
torch.cuda.max_memory_allocated() over the step; on CPU it is the rise of the process's peak
resident memory (VmHWM, reset through /proc/self/clear_refs just before the step) over the
resident memory after set-up, with glibc's mmap threshold fixed at 64 KiB so that freed memory
leaves the process at once and RSS follows what is allocated. Either way it is what the step adds
on top of the loaded model: activations kept for backward, gradients and temporaries.

Settings:
- tiny: the test-suite's tiny teacher, one full PromptSRC step (batch 8, all four loss terms).
- vit-l14-text: open_clip ViT-L-14's text tower (random weights, QuickGELU as OpenAI's) with IVLP
  depth 9 / 4 tokens, forward + backward over C class prompts: the part that grows with classes.
- vit-l14-image: the same for its image tower (224 px, depth 9), 1 and 2 images; a step's image
  side does not depend on the number of classes.

From two class counts the per-class cost is fitted (activation memory is linear in classes) and
extrapolated to 1000 classes (and the image side to a batch of 8).

    .venv/bin/python benchmarks/teacher_memory.py            # all settings (~8 min on 2 CPU cores)
    .venv/bin/python benchmarks/teacher_memory.py --quick    # tiny + ViT-L-14 at 10 classes only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

GIB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Bytes the enclosed code adds at its peak, over what was allocated when it started."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base
        return False


def _tiny_step(classes: int, chunk: int | None, device: torch.device):
    from promptkd.engine import TrainConfig
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Teacher
    from promptkd.stages.teacher import TeacherConfig, TeacherObjective

    cfg_json = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    }
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench-tiny-teacher.json")
        with open(path, "w") as f:
            json.dump(cfg_json, f)
        clip = load_clip(path, None, device=device)
    teacher = Teacher(clip, 2, 2, 2, 2).to(device)
    teacher.text.grad_checkpointing = bool(chunk)
    names = [f"class {i}" for i in range(classes)]
    cfg = TeacherConfig(model="tiny", text_chunk=chunk, train=TrainConfig())
    objective = TeacherObjective(teacher, names, cfg)
    images = torch.randn(8, 3, 32, 32, device=device)
    labels = torch.randint(0, classes, (8,), device=device)

    def step():
        loss, _ = objective((images, labels, None))
        loss.backward()

    return step


def _vitl14_text_step(classes: int, chunk: int | None, device: torch.device):
    import open_clip
    import torch.nn.functional as F
    from open_clip.model import _build_text_tower

    from promptkd.models.encoders import PromptedTextEncoder

    cfg = open_clip.get_model_config("ViT-L-14")
    text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=True).to(device)
    for p in text.parameters():
        p.requires_grad_(False)
    encoder = PromptedTextEncoder(text, open_clip.get_tokenizer("ViT-L-14"), depth=9, n_ctx=4,
                                  grad_checkpointing=bool(chunk)).to(device)
    tokens = encoder.tokenize_classnames([f"class number {i}" for i in range(classes)]).to(device)
    reference = F.normalize(torch.randn(classes, cfg["embed_dim"], device=device), dim=-1)
    image = F.normalize(torch.randn(8, cfg["embed_dim"], device=device), dim=-1)
    labels = torch.randint(0, classes, (8,), device=device)

    def step():
        w = F.normalize(encoder.encode(tokens, chunk), dim=-1)
        loss = F.cross_entropy(100 * image @ w.T, labels) + 25 * F.l1_loss(w, reference)
        loss.backward()

    return step


def _vitl14_image_step(images: int, chunk: None, device: torch.device):
    import open_clip
    import torch.nn.functional as F
    from open_clip.model import _build_vision_tower

    from promptkd.models.encoders import PromptedImageEncoder

    cfg = open_clip.get_model_config("ViT-L-14")
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=True).to(device)
    for p in visual.parameters():
        p.requires_grad_(False)
    encoder = PromptedImageEncoder(visual, depth=9, n_ctx=4).to(device)
    x = torch.randn(images, 3, 224, 224, device=device)
    reference = F.normalize(torch.randn(images, cfg["embed_dim"], device=device), dim=-1)

    def step():
        loss = 10 * F.l1_loss(F.normalize(encoder(x), dim=-1), reference)
        loss.backward()

    return step


def run_one(setting: dict) -> dict:
    device = torch.device(setting["device"])
    builder = {"tiny": _tiny_step, "vit-l14-text": _vitl14_text_step, "vit-l14-image": _vitl14_image_step}
    step = builder[setting["model"]](setting["classes"], setting["chunk"], device)
    t0 = time.perf_counter()
    with PeakMemory(device) as m:
        step()
    return {**setting, "peak_bytes": m.peak, "seconds": round(time.perf_counter() - t0, 2)}


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(intercept, slope) through two or more (classes, bytes) points (least squares)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def _fmt(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 4 else f"{b / 1024**2:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="skip the 50-class ViT-L-14 runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0

    settings = [("tiny", 100, None), ("tiny", 100, 10), ("tiny", 400, None), ("tiny", 400, 40),
                ("vit-l14-text", 10, None), ("vit-l14-text", 10, 5)]
    if not args.quick:
        settings += [("vit-l14-text", 50, None), ("vit-l14-text", 50, 10),
                     ("vit-l14-image", 1, None), ("vit-l14-image", 2, None)]  # "classes" = images here
    # A fixed glibc mmap threshold returns every freed block over 64 KiB to the OS at once; with the
    # default (adaptive) threshold, freed activations linger in the heap and inflate the CPU peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for model, classes, chunk in settings:
        one = json.dumps({"model": model, "classes": classes, "chunk": chunk, "device": args.device})
        out = subprocess.run([sys.executable, __file__, "--one", one, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{model:13s} classes {classes:5d} chunk {chunk!s:5s} peak {_fmt(r['peak_bytes']):>11s} "
              f"({r['seconds']} s)", file=sys.stderr)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, device {args.device}, {args.threads} threads\n")
    print("| setting | classes | images | text chunk | peak step memory | step time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        image = r["model"] == "vit-l14-image"
        classes, images = ("-", r["classes"]) if image else (r["classes"], 8 if r["model"] == "tiny" else "-")
        chunk = "-" if image else (r["chunk"] or "none")
        print(f"| {r['model']} | {classes} | {images} | {chunk} | {_fmt(r['peak_bytes'])} | {r['seconds']} s |")

    vit = [r for r in rows if r["model"] == "vit-l14-text"]
    full = [(r["classes"], r["peak_bytes"]) for r in vit if r["chunk"] is None]
    if len({c for c, _ in full}) >= 2:
        a, b = fit_line(full)
        print(f"\nViT-L-14 text tower, fp32: {_fmt(b)} per class without chunking (fit over {len(full)} points).")
        print(f"Estimate for 1000 classes, no chunking: {_fmt(a + 1000 * b)} (fp16 activations: about half).")
        # Chunked: peak = fixed + s*classes (outputs kept per class) + b*chunk (one chunk recomputed).
        pts = [(r["classes"], r["peak_bytes"] - b * r["chunk"]) for r in vit if r["chunk"] is not None]
        if len({c for c, _ in pts}) >= 2:
            fixed, s = fit_line(pts)
            s = max(s, 0.0)
            print(f"Chunked: {_fmt(s)} per class outside the chunk. Estimate for 1000 classes, --text-chunk 100: "
                  f"{_fmt(fixed + 1000 * s + 100 * b)}.")
    img = [(r["classes"], r["peak_bytes"]) for r in rows if r["model"] == "vit-l14-image"]
    if len({n for n, _ in img}) >= 2:
        a, b = fit_line(img)
        print(f"ViT-L-14 image tower (depth 9 prompts), fp32: {_fmt(b)} per image; batch 8: {_fmt(a + 8 * b)}.")
    if args.json:
        from promptkd.artifacts import write_json

        write_json(args.json, rows)  # atomic: a crash never leaves half a results file
    return 0


if __name__ == "__main__":
    sys.exit(main())
