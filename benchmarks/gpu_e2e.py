"""End to end on one GPU: the real `promptkd cache` and `promptkd distill --teacher-cache` through the
CLI, against the compute-only step rate and the official code's step. One command:

    python benchmarks/gpu_e2e.py --official-repo /path/to/PromptKD --out e2e-out

1. Writes an ImageNet-like JPEG folder (benchmarks/photos.py: 500x375, ~100 KB; --images across
   --classes class folders, plus one val and one test image per class), with all cores.
2. Saves a prompted teacher with random CLIP weights (--teacher-model, default ViT-L-14; speed
   does not depend on the values) and runs `promptkd cache` (K = --views) over the folder.
3. Runs `promptkd distill --teacher-cache` for --epochs epochs (default 2) with a random-weight
   student (--student-model, default ViT-B-16), all cores but one as loader workers, batch
   --batch, no per-epoch validation. End-to-end images/s is the last epoch's (metrics.json:
   history images_per_s: every step of the epoch, data loading included; the first epoch
   carries the compile and warm-up).
4. Runs benchmarks/distill_step.py (compiled, bound) at the same batch and class count,
   and the eager and compiled steps at batch 8 / 100 classes (the paper's setting).
5. Runs the official step (--official-step, default ../shared/tools/official_step_gpu.py beside the
   repo) on the official repository's own clip/model.py at --official-repo, at batch 8 / 100 classes
   and at --batch / --classes; without a checkout that row says so and is skipped.
6. With --ranks 1,2,4,...: reruns `promptkd cache` and `promptkd distill --teacher-cache` under
   `torchrun --nproc-per-node R` for each R > 1 (one GPU per rank; gloo processes with --device cpu),
   at --batch images per rank (global batch R x --batch), and reports images/s per rank: how far
   the stages scale on this machine (1.0x per rank = perfect).

Prints one table and writes report.json/report.md into --out. `--device cpu --precision fp32` with
tiny model configs runs the same pipeline on CPU (the test suite does, at a few dozen images).
Sized to finish within 8 minutes on one H200 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from photos import write_photo_folder  # benchmarks/ is the script's folder: first on sys.path

HERE = Path(__file__).resolve().parent
DEFAULT_OFFICIAL_STEP = HERE.parent.parent / "shared" / "tools" / "official_step_gpu.py"


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run a command, its output into `log`; returns its wall seconds; a failure raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode
    if code:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {code}; end of {log}:\n{tail}")
    return time.perf_counter() - t0


def write_dataset(root: Path, images: int, classes: int, width: int, height: int, workers: int) -> None:
    write_photo_folder(root / "train", images, classes, width, height, workers)
    for split in ("val", "test"):  # one image per class: the final evaluation stays short
        write_photo_folder(root / split, classes, classes, width, height, workers)


def save_random_teacher(model: str, path: Path, depth: int) -> None:
    import torch

    from promptkd.models import load_clip
    from promptkd.models.wrappers import Teacher

    torch.manual_seed(0)
    Teacher(load_clip(model, None), depth, depth, 4, 4).save(path)


def step_rows(args, batch: int, classes: int, modes: str, out: Path, tag: str) -> list[dict]:
    rows_file = out / f"step-{tag}.json"
    cmd = [sys.executable, str(HERE / "distill_step.py"), "--teacher", args.teacher_model, "--student",
           args.student_model, "--classes", str(classes), "--batch", str(batch), "--steps", str(args.step_steps),
           "--warmup", str(args.step_warmup), "--device", args.device, "--precision", args.precision, "--modes", modes,
           "--teacher-depth", str(args.depth), "--student-depth", str(args.depth), "--json", str(rows_file),
           "--threads", str(args.threads)]
    _run(cmd, out / f"step-{tag}.log", env=_thread_env(args))
    return json.loads(rows_file.read_text())


def _thread_env(args) -> dict:
    return {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}


def official_row(args, batch: int, classes: int, out: Path, tag: str) -> dict | str:
    step = Path(args.official_step)
    repo = Path(args.official_repo) if args.official_repo else None
    if repo is None or not (repo / "clip" / "model.py").is_file():
        return f"skipped: no official PromptKD checkout (clip/model.py) at {repo}; pass --official-repo"
    if not step.is_file():
        return f"skipped: {step} not found; pass --official-step"
    result = out / f"official-{tag}.json"
    cmd = [sys.executable, str(step), "--classes", str(classes), "--batch", str(batch), "--steps", str(args.step_steps),
           "--json", str(result)] + (["--tiny"] if args.device == "cpu" else [])
    _run(cmd, out / f"official-{tag}.log", env={"PKD_OFFICIAL_SRC": str(repo)})
    return json.loads(result.read_text())


def rank_rows(args, report: dict, cli: list[str], common: list[str], teacher: Path, out: Path) -> list[dict]:
    """Cache and distillation throughput per rank at each of --ranks (1: the main run above)."""
    rows = []
    for r in sorted({int(x) for x in args.ranks.split(",")}):
        if r == 1:
            e2e, cache_s = report["e2e"]["images_per_s"], report["seconds"]["cache"]
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={r}", *cli[1:]]
            cache_dir, run_dir = out / f"cache-r{r}", out / f"distill-r{r}"
            cache_s = _run([*launch, "cache", "--teacher", str(teacher), *common, "--views", str(args.views),
                            "--batch-size", str(args.cache_batch), "--shard-size", str(args.shard_size),
                            "--out", str(cache_dir), "--overwrite"], out / f"cache-r{r}.log", env=_thread_env(args))
            _run([*launch, "distill", "--teacher", str(teacher), *common, "--teacher-cache", str(cache_dir),
                  "--student-model", args.student_model, "--student-weights", "none", "--vision-depth", str(args.depth),
                  "--epochs", str(args.epochs), "--batch-size", str(args.batch * r), "--no-val", "--compile", "off",
                  "--out", str(run_dir), "--overwrite"], out / f"distill-r{r}.log", env=_thread_env(args))
            e2e = json.loads((run_dir / "metrics.json").read_text())["history"][-1]["images_per_s"]
        rows.append({"ranks": r, "global_batch": args.batch * r, "images_per_s": e2e, "images_per_s_per_rank": e2e / r,
                     "cache_seconds": cache_s, "cache_views_per_s_per_rank": args.images * args.views / cache_s / r})
    base = rows[0]
    for row in rows:
        row["scaling_per_rank"] = row["images_per_s_per_rank"] / base["images_per_s_per_rank"]
    return rows


def run(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    workers = args.num_workers if args.num_workers is not None else max(cores - 1, 1)
    w, h = (int(v) for v in args.image_size.split("x"))
    report: dict = {"images": args.images, "classes": args.classes, "batch": args.batch, "workers": workers,
                    "views": args.views, "device": args.device, "precision": args.precision, "epochs": args.epochs,
                    "teacher": args.teacher_model, "student": args.student_model, "cores": cores, "seconds": {}}
    t0 = time.perf_counter()
    data = out / "data"
    write_dataset(data, args.images, args.classes, w, h, cores)
    report["seconds"]["images"] = time.perf_counter() - t0

    teacher = out / "teacher.safetensors"
    save_random_teacher(args.teacher_model, teacher, args.depth)
    cli = [sys.executable, "-m", "promptkd.cli"]
    common = ["--dataset", f"folder:{data}", "--protocol", "cross", "--device", args.device, "--precision",
              args.precision, "--num-workers", str(workers), "--no-progress"]
    if args.teacher_model.endswith(".json"):  # a config file: name it even if the artifact moved with it
        common += ["--teacher-model", args.teacher_model]
    cache_dir = out / "cache"
    report["seconds"]["cache"] = _run([*cli, "cache", "--teacher", str(teacher), *common, "--views", str(args.views),
                                       "--batch-size", str(args.cache_batch), "--shard-size", str(args.shard_size),
                                       "--out", str(cache_dir), "--overwrite"],
                                      out / "cache.log",
                                      env=_thread_env(args))
    run_dir = out / "distill"
    report["seconds"]["distill"] = _run(
        [*cli, "distill", "--teacher", str(teacher), *common, "--teacher-cache", str(cache_dir),
         "--student-model", args.student_model, "--student-weights", "none", "--vision-depth", str(args.depth),
         "--epochs", str(args.epochs), "--batch-size", str(args.batch), "--no-val", "--compile", args.compile,
         "--out", str(run_dir), "--overwrite"], out / "distill.log", env=_thread_env(args))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["history"][-1]
    report["e2e"] = {"images_per_s": last["images_per_s"], "epoch_seconds": last["seconds"],
                     "first_epoch_images_per_s": metrics["history"][0]["images_per_s"],
                     "compile": metrics["train"]["config"].get("compile")}
    report["cache_images_per_s"] = args.images * args.views / report["seconds"]["cache"]  # whole command

    report["ranks"] = rank_rows(args, report, cli, common, teacher, out)
    report["step"] = step_rows(args, args.batch, args.classes, args.step_modes, out, "main")
    report["step_paper"] = step_rows(args, 8, 100, args.paper_modes, out, "paper") if args.paper_modes else []
    report["official"] = official_row(args, args.batch, args.classes, out, "main")
    report["official_paper"] = official_row(args, 8, 100, out, "paper") if args.paper_modes else "not run"
    report["seconds"]["total"] = time.perf_counter() - t0
    return report


def table(r: dict) -> str:
    step = {row["mode"]: row for row in r["step"]}
    paper = {row["mode"]: row for row in r["step_paper"]}
    compute = step.get("compiled") or step.get("cached")
    e2e = r["e2e"]["images_per_s"]
    lines = [f"{r['teacher']} teacher (cache, K={r['views']}) -> {r['student']} student, {r['classes']} classes, "
             f"{r['images']} JPEGs, batch {r['batch']}, {r['workers']} loader workers of {r['cores']} cores, "
             f"{r['device']} {r['precision']}, compile {r['e2e']['compile']}", "",
             "| what | batch | classes | images/s | s/step |", "|---|---|---|---|---|"]

    def row(name, batch, classes, ips):
        lines.append(f"| {name} | {batch} | {classes} | {ips:.1f} | {batch / ips:.4f} |")

    row(f"end to end: promptkd distill --teacher-cache (epoch {r['epochs']})", r["batch"], r["classes"], e2e)
    for mode, label in (("compiled", "compute only: compiled step"), ("cached", "compute only: eager cached step"),
                        ("bound", "FLOP bound of the student step")):
        if mode in step:
            row(label, r["batch"], r["classes"], step[mode]["images_per_s"])
    for key, batch, classes in (("official", r["batch"], r["classes"]), ("official_paper", 8, 100)):
        off = r[key]
        if isinstance(off, dict):
            row("official step (its clip/model.py, fp16)", batch, classes, off["images_per_s"])
        elif off != "not run":
            lines.append(f"| official step | {batch} | {classes} | {off} | |")
    for mode, label in (("compiled", "compiled step"), ("cached", "eager cached step")):
        if mode in paper:
            row(label, 8, 100, paper[mode]["images_per_s"])
    lines += ["", f"end to end / compute only: {100 * e2e / compute['images_per_s']:.0f}% (target >= 85%); "
                  f"promptkd cache: {r['cache_images_per_s']:.0f} views/s over the whole command; "
                  f"wall: {', '.join(f'{k} {v:.0f} s' for k, v in r['seconds'].items())}"]
    if len(r["ranks"]) > 1:
        lines += ["", "| ranks | global batch | distill images/s | per rank | per rank vs 1 rank | cache views/s per rank |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['ranks']} | {x['global_batch']} | {x['images_per_s']:.1f} | {x['images_per_s_per_rank']:.1f} | "
                  f"{x['scaling_per_rank']:.2f}x | {x['cache_views_per_s_per_rank']:.1f} |" for x in r["ranks"]]
    if "compiled" in paper:
        lines.append(f"compiled step at batch 8, 100 classes: {1000 * paper['compiled']['s_per_step']:.1f} ms "
                     "(target <= 6 ms on an H200)")
    if "compiled" in step and "bound" in step:
        lines.append(f"compiled step at batch {r['batch']}: {step['compiled']['s_per_step'] / step['bound']['s_per_step']:.2f}x "
                     "its FLOP bound (target <= 2x on an H200)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-e2e-out")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--image-size", default="500x375", metavar="WxH")
    p.add_argument("--views", type=int, default=1, help="teacher cache views per image")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache-batch", type=int, default=256, help="views per teacher forward in promptkd cache")
    p.add_argument("--shard-size", type=int, default=1024, help="images per cache shard (the unit a rank takes)")
    p.add_argument("--ranks", default="1", metavar="R,R,...",
                   help="also run cache and distill under torchrun with these process counts (e.g. 1,2,4,8)")
    p.add_argument("--num-workers", type=int, help="loader workers (default: all cores but one)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--teacher-model", default="ViT-L-14")
    p.add_argument("--student-model", default="ViT-B-16")
    p.add_argument("--depth", type=int, default=9, help="prompt depth of teacher and student")
    p.add_argument("--step-modes", default="compiled,bound", help="distill_step.py modes at --batch / --classes")
    p.add_argument("--step-steps", type=int, default=20)
    p.add_argument("--step-warmup", type=int, default=5)
    p.add_argument("--paper-modes", default="cached,compiled",
                   help="distill_step.py modes at batch 8 / 100 classes ('' skips those rows and the official one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--official-repo", help="checkout of the official PromptKD repository (zhengli97/PromptKD)")
    p.add_argument("--official-step", default=str(DEFAULT_OFFICIAL_STEP))
    args = p.parse_args(argv)
    report = run(args)
    text = table(report)
    print(text)
    out = Path(args.out)
    from promptkd.artifacts import atomic_open, write_json

    write_json(out / "report.json", report)  # atomic: a crash never leaves half a report
    with atomic_open(out / "report.md", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
