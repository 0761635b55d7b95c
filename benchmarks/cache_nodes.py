"""A two-node teacher-cache build against one process, on one machine (issue #24's target: at most
0.75x the one-process wall time on a 2-core machine, one thread per process; the same cache; equal
students distilled from either).

    python benchmarks/cache_nodes.py --out cache-nodes-out

1. Writes a JPEG folder (benchmarks/photos.py) and saves a prompted teacher with random weights on a
   compute-heavy CLIP config (--width, --layers, --image: the teacher forward dominates, as a
   ViT-L/14 does at ImageNet scale).
2. `promptkd cache` in one process (OMP_NUM_THREADS=1), then the same under two torchrun launches
   (`--nnodes 2 --nproc-per-node 1`, c10d rendezvous on 127.0.0.1: two nodes on one machine), each
   process one thread. Wall time of the whole commands (start-up and rendezvous included). With
   --repeats N the two are alternated N times and the fastest of each is kept (a shared machine).
3. Checks the caches are byte-identical tensors, distils a tiny student from each (one process,
   --epochs 1) and checks the students are equal.

Prints one table; writes report.json / report.md into --out with the machine's load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from photos import write_photo_folder  # benchmarks/ is the script's folder: first on sys.path

SRC = Path(__file__).resolve().parents[1] / "src"


def clip_config(width: int, layers: int, image: int, patch: int) -> dict:
    return {"embed_dim": width // 2,
            "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch, "head_width": 64},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def timed(cmds: list[list[str]], logs: list[Path]) -> tuple[float, list[float]]:
    """Start the commands together (one per node), wait for all: their wall seconds, and the CPU
    seconds (user + system) of each command with all its processes. A failure raises."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env) for c, f in zip(cmds, files)]
    codes, cpu = [], []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)  # the launch and every process it waited for
        p.returncode = os.waitstatus_to_exitcode(status)
        codes.append(p.returncode)
        cpu.append(usage.ru_utime + usage.ru_stime)
    seconds = time.perf_counter() - t0
    for f in files:
        f.close()
    for code, log in zip(codes, logs):
        if code:
            raise RuntimeError(f"failed with exit code {code}; see {log}:\n{log.read_text()[-2000:]}")
    return seconds, cpu


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    import torch

    from promptkd.models import load_clip
    from promptkd.models.wrappers import Teacher
    from promptkd.stages.cache import TeacherCache

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "train").is_dir():
        write_photo_folder(data / "train", args.images, args.classes, 160, 120, os.cpu_count() or 1)
        write_photo_folder(data / "test", args.classes, args.classes, 160, 120, 1)
    t_cfg, s_cfg = out / "teacher-clip.json", out / "student-clip.json"
    t_cfg.write_text(json.dumps(clip_config(args.width, args.layers, args.image, args.patch)))
    s_cfg.write_text(json.dumps(clip_config(64, 2, 32, 8)))
    teacher = out / "teacher.safetensors"
    torch.manual_seed(0)
    Teacher(load_clip(str(t_cfg), None), 2, 2, 4, 4).save(teacher)

    cli = ["-m", "promptkd.cli", "-q", "cache", "--teacher", str(teacher), "--teacher-model", str(t_cfg),
           "--dataset", f"folder:{data}", "--protocol", "cross", "--views", str(args.views), "--shard-size",
           str(args.shard_size), "--batch-size", str(args.cache_batch), "--device", "cpu", "--no-progress"]
    one_s, two_s, one_cpu, two_cpu = [], [], [], []
    load_before = os.getloadavg()
    for i in range(args.repeats):
        wall, cpu = timed([[sys.executable, *cli, "--out", str(out / "cache-one"), "--overwrite"]],
                          [out / f"one-{i}.log"])
        one_s.append(wall)
        one_cpu.append(cpu[0])
        port = free_port()
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                  "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=cache-{port}"]
        wall, cpu = timed([[*launch, *cli, "--out", str(out / "cache-two"), "--overwrite"]] * 2,
                          [out / f"two-{i}-node{n}.log" for n in range(2)])
        two_s.append(wall)
        two_cpu.append(cpu)
    load_after = os.getloadavg()

    a, b = TeacherCache(out / "cache-one").read_all(), TeacherCache(out / "cache-two").read_all()
    same_cache = all(torch.equal(x, y) for x, y in zip(a, b))
    students = []
    for name in ("one", "two"):
        run_dir = out / f"student-{name}"
        timed([[sys.executable, "-m", "promptkd.cli", "-q", "distill", "--teacher", str(teacher), "--teacher-model",
                str(t_cfg), "--dataset", f"folder:{data}", "--protocol", "cross", "--teacher-cache",
                str(out / f"cache-{name}"), "--student-model", str(s_cfg), "--student-weights", "none",
                "--vision-depth", "2", "--n-ctx-vision", "2", "--epochs", "1", "--batch-size", "8", "--no-val",
                "--kd-weight", "1", "--device", "cpu", "--no-progress", "--out", str(run_dir), "--overwrite"]],
              [out / f"distill-{name}.log"])
        from safetensors.torch import load_file

        students.append(load_file(run_dir / "student.safetensors"))
    same_student = students[0].keys() == students[1].keys() and all(
        torch.equal(students[0][k], students[1][k]) for k in students[0])
    return {"images": args.images, "views": args.views, "shard_size": args.shard_size,
            "teacher": {"width": args.width, "layers": args.layers, "image": args.image, "patch": args.patch},
            "one_process_s": one_s, "two_nodes_s": two_s, "ratio": min(two_s) / min(one_s),
            "one_process_cpu_s": one_cpu, "two_nodes_cpu_s": two_cpu,
            "cpu_bound_ratio": min(max(c) for c in two_cpu) / min(one_cpu),
            "same_cache": same_cache, "same_student": same_student, "cores": os.cpu_count(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "load_average_before": load_before, "load_average_after": load_after}


def table(r: dict) -> str:
    t = r["teacher"]
    return "\n".join([
        f"teacher cache of {r['images']} images x {r['views']} views, teacher ViT width {t['width']} x {t['layers']} "
        f"layers at {t['image']}px/{t['patch']}, shards of {r['shard_size']}; {r['cores']} cores, one thread per "
        f"process; load average {r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after",
        "", "| run | wall s (each repeat) | best | CPU s of each node (each repeat) |", "|---|---|---|---|",
        f"| one process | {', '.join(f'{s:.1f}' for s in r['one_process_s'])} | {min(r['one_process_s']):.1f} | "
        f"{', '.join(f'{s:.1f}' for s in r['one_process_cpu_s'])} |",
        f"| two nodes (torchrun --nnodes 2, c10d on 127.0.0.1) | {', '.join(f'{s:.1f}' for s in r['two_nodes_s'])} | "
        f"{min(r['two_nodes_s']):.1f} | {'; '.join(' + '.join(f'{c:.1f}' for c in cs) for cs in r['two_nodes_cpu_s'])} |",
        "", f"two nodes / one process, wall: {r['ratio']:.2f}x (target <= 0.75x); the busier node's CPU seconds / "
        f"the one process's: {r['cpu_bound_ratio']:.2f}x (start-up included: a lower bound of the wall ratio on two idle cores); "
        f"cache identical: {r['same_cache']}; students distilled from either equal: {r['same_student']}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="cache-nodes-out")
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=10)
    p.add_argument("--cache-batch", type=int, default=16)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    sys.path.insert(0, str(SRC))
    report = run(args)
    text = table(report)
    print(text)
    from promptkd.artifacts import atomic_open, write_json

    write_json(Path(args.out) / "report.json", report)
    with atomic_open(Path(args.out) / "report.md", "w") as f:
        f.write(text + "\n")
    return 0 if report["same_cache"] and report["same_student"] else 1


if __name__ == "__main__":
    sys.exit(main())
