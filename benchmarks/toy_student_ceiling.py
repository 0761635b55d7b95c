"""What limits the distilled toy student: the same trainable parts trained WITH labels.

PromptKD trains only the student's prompts and projector; its image tower stays frozen. This
script trains exactly those parts by cross-entropy against the demo's class vectors on the demo's
train images *with their labels* (which distillation never sees), for a few prompt settings.
The result is a ceiling for what any distillation can reach with that student. Run it after
`promptkd demo --out DIR`:

    python benchmarks/toy_student_ceiling.py --demo-out demo-out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from promptkd.cpu import use_passive_openmp

use_passive_openmp()  # as the promptkd command does, before torch loads (promptkd.cpu)
import torch  # noqa: E402


def main(argv=None) -> int:
    from promptkd.data.dataset import ImageDataset
    from promptkd.data.protocols import build_protocol
    from promptkd.data.transforms import transforms_for
    from promptkd.engine import TrainConfig, train_loop
    from promptkd.metrics import evaluate_splits
    from promptkd.models import load_clip
    from promptkd.models.wrappers import ClassVectors, Student

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-out", default="demo-out")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--settings", default="0:4,3:8,3:16", help="depth:ctx pairs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.demo_out)
    data = out / "data"
    protocol = build_protocol("base2novel", f"split:{(data / 'split_zhou_Toy.json').resolve()}", str((data / "images").resolve()))
    cv = ClassVectors.load(out / "class_vectors.safetensors")
    rows = []
    for setting in args.settings.split(","):
        depth, ctx = (int(x) for x in setting.split(":"))
        student = Student(load_clip("toy-student"), cv.dim, depth, ctx)
        preprocess = student.clip.preprocess_cfg
        dataset = ImageDataset(protocol.train, transforms_for(preprocess)[0], seed=1)

        def loss_fn(batch, student=student):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(student.logit_scale * student(x) @ cv.vectors.T, y), {}

        train_loop(student, loss_fn, dataset, TrainConfig(epochs=args.epochs, batch_size=32, lr=args.lr, progress=False),
                   out / f"ceiling-d{depth}-c{ctx}")
        student.eval()
        res = evaluate_splits(student, cv.vectors, protocol.test, transforms_for(preprocess)[1], progress=False)
        rows.append({"depth": depth, "ctx": ctx, **{k: round(v, 1) for k, v in res.items()}})
        print(json.dumps(rows[-1]), flush=True)
    demo = json.loads((out / "metrics.json").read_text())
    print("\n| student trained on | prompt depth | ctx | base | novel | HM |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| labels (ceiling) | {r['depth']} | {r['ctx']} | {r['base']} | {r['novel']} | {r['hm']} |")
    s = demo["student"]
    print(f"| teacher logits (demo) | - | - | {s['base']:.1f} | {s['novel']:.1f} | {s['hm']:.1f} |")
    t = demo["teacher"]
    print(f"\ntuned teacher: {t['base']:.1f} / {t['novel']:.1f} / HM {t['hm']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
