"""Which KD weight to use on a dataset outside the 11 benchmarks: distillation on toy domains of
about 5, 20 and 100 classes, under several weights, against the student's zero-shot baseline.

Each setup stands in for a user's own dataset: a toy-world domain with N classes
(`promptkd toy domain --n-classes N`), a toy teacher tuned with PromptSRC on 16 shots of its base
classes (the demo's teacher settings, configs/demo/toy.yaml), class vectors, a teacher-output
cache (K = 8 views, shared by every weight), then `promptkd distill` with the distill defaults a
user gets (lr 0.005, batch 8, SGD; `--epochs`, 10 here as in issue #16) and the demo's student
prompts (depth 3, 8 tokens), once per rule:

- `official`: weight 1000 under the official reduction (sum KL / (B*C)): 1000/C per image;
- `image:W`: W per image, i.e. weight W*C under the official reduction (`--kd-reduction batchmean
  --kd-weight W` is the same loss); `promptkd distill`'s default on such a dataset is
  `image:1` (CUSTOM_KD_PER_IMAGE, marked "default").

The tables give base / novel / HM of the student zero-shot (its own text tower) and of the tuned
teacher (class vectors) per setup, then per rule the distilled student (last epoch) for each
distillation seed, its mean, the worst seed against the zero-shot baseline, and the share of the
teacher-student gap the mean closes. Everything is seeded; on one machine, thread count and
library versions a rerun gives the same numbers (finished runs in --out are reused).

    python benchmarks/kd_rule.py --out runs/kd-rule                   # 5, 20, 100 classes
    python benchmarks/kd_rule.py --classes 5 --rules official image:10 --out runs/kd-rule
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from pathlib import Path

from promptkd.cpu import use_passive_openmp

use_passive_openmp()  # as the promptkd command does, before torch loads (promptkd.cpu)
import torch  # noqa: E402


def _classnames(setup: str) -> list[str]:
    """A class count (random classes, custom_classnames) or a comma-separated list of class names."""
    from promptkd.toy.world import custom_classnames

    return custom_classnames(int(setup)) if setup.isdigit() else sorted(c.strip() for c in setup.split(","))


def _setup(names: list[str], out: Path, args) -> dict:
    """Domain, tuned teacher, class vectors and cache of one setup (reused when present)."""
    from promptkd.data.protocols import build_protocol
    from promptkd.inputs import load_teacher
    from promptkd.stages.cache import CacheSpec, build_teacher_cache
    from promptkd.stages.class_vectors import write_class_vectors
    from promptkd.stages.demo import DemoConfig
    from promptkd.stages.teacher import TeacherConfig, train_teacher
    from promptkd.toy.world import World

    n_train = max(8, min(args.n_train, args.max_train_images // len(names)))
    world = World(args.seed, classnames=names)
    data = out / "data"
    if not (data / "split_zhou_Toy.json").is_file():
        world.write_domain(data, n_train=n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    spec = {"dataset": f"split:{(data / 'split_zhou_Toy.json').resolve()}", "root": str((data / "images").resolve())}
    teacher_path = out / "teacher" / "teacher.safetensors"
    if not teacher_path.is_file():
        section = DemoConfig.load().teacher
        train = {**section.get("train", {}), "progress": False}
        train_teacher(TeacherConfig.from_dict({**section, **spec, "seed": args.seed + 1, "train": train}),
                      out / "teacher")
    protocol = build_protocol("base2novel", spec["dataset"], spec["root"])
    cv_path, cache = out / "class_vectors.safetensors", out / "teacher_cache"
    if not cv_path.is_file() or not (cache / "manifest.json").is_file():
        teacher = load_teacher(teacher_path)
        write_class_vectors(teacher, protocol.classnames, cv_path)
        build_teacher_cache(teacher, protocol.train, None, cache, CacheSpec(views=8, seed=args.seed), progress=False)
    return {**spec, "teacher": str(teacher_path), "class_vectors": str(cv_path), "teacher_cache": str(cache),
            "n_train": n_train, "train_images": len(protocol.train)}


# Six classes that differ in colour and in shape, the student near-perfect zero-shot: the kind of
# small, easy folder on which issue #16 saw the official weight (1000/6 = 167 per image) hurt.
EASY_SIX = "blue square,cyan ring,green triangle,purple cross,red circle,yellow star"


def _kd_weight(rule: str, n: int) -> float:
    if rule == "official":
        return 1000.0
    return float(rule.removeprefix("image:")) * n


def _distill(setup: dict, rule: str, n: int, seed: int, out: Path, args) -> dict:
    from promptkd.stages.distill import DistillConfig, distill

    run = out / f"{rule.replace(':', '-')}-seed{seed}"
    if not (run / "metrics.json").is_file():
        cfg = DistillConfig.from_dict({
            **{k: setup[k] for k in ("dataset", "root", "teacher", "class_vectors", "teacher_cache")},
            "protocol": "base2novel", "student_model": "toy-student", "student_weights": "toy",
            "vision_depth": 3, "n_ctx_vision": 8, "kd_weight": _kd_weight(rule, n),
            "train": {"epochs": args.epochs, "seed": seed, "device": "cpu", "progress": False}})
        distill(cfg, run)
    return json.loads((run / "metrics.json").read_text())


def _fmt(s: dict) -> str:
    return f"{s['base']:.1f} / {s['novel']:.1f} / **{s['hm']:.1f}**"


def main(argv=None) -> int:
    from promptkd.kd import CUSTOM_KD_PER_IMAGE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/kd-rule", help="work folder (finished parts are reused)")
    p.add_argument("--classes", nargs="+", default=["5", "20", "100", EASY_SIX],
                   help="setups: a class count (random classes) or comma-separated class names")
    p.add_argument("--rules", nargs="+", default=["official", "image:1", "image:3", "image:10", "image:30"])
    p.add_argument("--distill-seeds", nargs="+", type=int, default=[1, 2], help="one run per seed and rule")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--n-train", type=int, default=64, help="unlabelled train images per class ...")
    p.add_argument("--max-train-images", type=int, default=2400, help="... at most this many in all")
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="the domain's images and the teacher")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setups, rows = [], []
    for spec in args.classes:
        names = _classnames(spec)
        n = len(names)
        out = Path(args.out) / (f"classes-{n}" if spec.isdigit() else f"named-{n}-{zlib.crc32(spec.encode()):08x}")
        t0 = time.perf_counter()
        setup = _setup(names, out, args)
        label = str(n) if spec.isdigit() else f"{n} named"
        print(f"{label} classes: {setup['train_images']} unlabelled images, teacher ready "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for rule in args.rules:
            runs = []
            for seed in args.distill_seeds:
                t0 = time.perf_counter()
                runs.append(_distill(setup, rule, n, seed, out, args))
                print(json.dumps({"setup": label, "rule": rule, "seed": seed, "kd_weight": runs[-1]["kd_weight"],
                                  "hm": round(runs[-1]["results"]["last"]["hm"], 2),
                                  "s": round(time.perf_counter() - t0)}), flush=True)
            base = runs[0]["baseline"]
            if rule == args.rules[0]:
                setups.append((label, names, setup["train_images"], base["student_zero_shot"], base["teacher"]))
            last = [r["results"]["last"] for r in runs]
            mean = {k: sum(x[k] for x in last) / len(last) for k in ("base", "novel", "hm")}
            zs, teacher = base["student_zero_shot"]["hm"], base["teacher"]["hm"]
            rows.append({"setup": label, "rule": rule, "kd_weight": runs[0]["kd_weight"],
                         "per_image": runs[0]["kd_weight"] / n, "hms": [x["hm"] for x in last], "mean": mean,
                         "vs_zero_shot": min(x["hm"] for x in last) - zs,
                         "gap_closed": (mean["hm"] - zs) / (teacher - zs) if teacher > zs else math.nan})
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; distillation: lr 0.005, batch 8, "
          f"{args.epochs} epochs, teacher cache K = 8, seeds {args.distill_seeds}\n")
    print("| setup | classes | unlabelled images | student zero-shot | tuned teacher |\n|---|---|---|---|---|")
    for label, names, images, zs, teacher in setups:
        shown = ", ".join(names) if len(names) <= 6 else f"{names[0]}, ..., {names[-1]}"
        print(f"| {label} | {shown} | {images} | {_fmt(zs)} | {_fmt(teacher)} |")
    print("\n| setup | rule | kd weight (per image) | distilled HM per seed | distilled, mean | worst seed - zero-shot "
          "| gap closed (mean) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        rule = f"{r['rule']} (default)" if r["rule"] != "official" and r["per_image"] == CUSTOM_KD_PER_IMAGE else r["rule"]
        closed = "-" if math.isnan(r["gap_closed"]) else f"{100 * r['gap_closed']:.0f} %"
        print(f"| {r['setup']} | {rule} | {r['kd_weight']:g} ({r['per_image']:.3g}) | "
              f"{' / '.join(f'{h:.1f}' for h in r['hms'])} | {_fmt(r['mean'])} | {r['vs_zero_shot']:+.1f} | {closed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
