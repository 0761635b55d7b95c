#!/usr/bin/env python
"""Reproduce the PromptKD paper's student tables: base-to-novel (11 datasets), cross-dataset (10
targets) and domain generalisation (4 ImageNet variants), 3 seeds each, then aggregate them.

Every setting comes from configs/protocols/*.yaml (datasets, seeds, KD weights, preset); this
script only turns them into `promptkd distill` and `promptkd report` command lines and runs them.
Finished runs (metrics.json present) are skipped and interrupted ones resumed, so it can simply be
rerun. Teachers are expected at the paths the protocol files name, under --teachers: train them
with `promptkd teacher` or import the official checkpoints.

    python scripts/reproduce_paper.py --data $DATA --teachers teachers --out runs --dry-run
    python scripts/reproduce_paper.py --data $DATA --teachers teachers --out runs --nproc 4
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_FILES = {
    "base2novel": "configs/protocols/base2novel.yaml",
    "cross": "configs/protocols/cross_dataset.yaml",
    "dg": "configs/protocols/domain_generalisation.yaml",
}


def promptkd(nproc: int) -> list[str]:
    """How to start the CLI: one process, or torchrun with N (the batch of 8 is split across them)."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "promptkd.cli"]
    return [sys.executable, "-m", "promptkd.cli"]


def commands(args) -> list[list[str]]:
    out = Path(args.out)
    cmds = []
    for name in args.protocols:
        spec = yaml.safe_load((REPO / PROTOCOL_FILES[name]).read_text())
        seeds = args.seeds or spec["seeds"]
        for dataset, settings in spec["datasets"].items():
            teacher = spec["teacher"].format(teachers=args.teachers, dataset=dataset)
            for seed in seeds:
                run_dir = out / name / dataset / f"seed{seed}"
                if (run_dir / "metrics.json").is_file() and not args.dry_run:
                    continue
                cmd = [*promptkd(args.nproc), "distill", "--config", str(REPO / spec["preset"]),
                       "--protocol", spec["protocol"], "--dataset", dataset, "--root", args.data,
                       "--teacher", teacher, "--kd-weight", str(settings["kd_weight"]), "--seed", str(seed),
                       "--out", str(run_dir)]
                if args.teacher_weights:
                    cmd += ["--teacher-weights", args.teacher_weights]
                if args.student_weights:
                    cmd += ["--student-weights", args.student_weights]
                if (run_dir / "checkpoint.safetensors").is_file():
                    cmd.append("--resume")
                elif run_dir.is_dir() and any(run_dir.iterdir()):  # started, stopped before a checkpoint
                    cmd.append("--overwrite")
                cmds.append(cmd)
        cmds.append([sys.executable, "-m", "promptkd.cli", "report", str(out / name), "--out",
                     str(out / "tables" / name)])
    return cmds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data root holding the CoOp dataset folders")
    p.add_argument("--teachers", required=True, help="folder of teacher artifacts (see configs/protocols)")
    p.add_argument("--out", default="runs/paper")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOL_FILES), default=list(PROTOCOL_FILES))
    p.add_argument("--seeds", nargs="+", type=int, help="override the protocol files' seeds")
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun)")
    p.add_argument("--teacher-weights", help="the teachers' CLIP weights, if they moved since the teachers were made")
    p.add_argument("--student-weights", help="the student's CLIP weights (default: open_clip 'openai'), "
                                               "e.g. clip/ViT-B-16.pt")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = p.parse_args(argv)
    for cmd in commands(args):
        if args.dry_run:
            print(shlex.join(cmd))
        else:
            print("+", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
