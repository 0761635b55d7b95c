"""Report the toy CLIPs' zero-shot accuracy on the domain, their size and their speed.

``python -m promptkd.toy.zero_shot`` prints one JSON line per model: domain
base / novel / HM with the prompt "a photo of a {class}." on the domain test split
(50 images per class, seed 0), the same classes drawn in the pretraining style, the
image-tower multiply-accumulates, and images per second of the image tower on this
machine. These are the numbers quoted in docs/toy-world.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from promptkd.toy.models import (
    build_toy_clip,
    image_tower_macs,
    read_toy_metadata,
    toy_model_names,
    toy_weights_path,
)
from promptkd.toy.pretrain import normalize_images, zero_shot_eval
from promptkd.toy.world import World


@torch.no_grad()
def image_throughput(model, batch_size: int = 256, repeats: int = 5) -> float:
    """Images per second through ``model.encode_image`` (after one warm-up batch)."""
    x = normalize_images(World(0).domain_split("val", max(1, batch_size // 24 + 1))[0][:batch_size])
    model.encode_image(x)
    t = time.perf_counter()
    for _ in range(repeats):
        model.encode_image(x)
    return batch_size * repeats / (time.perf_counter() - t)


def report(name: str, weights=None, n_per_class: int = 50, seed: int = 0, speed: bool = True) -> dict:
    model, _, tokenizer = build_toy_clip(name, weights=weights)
    world = World(0)
    path = weights or toy_weights_path(name)
    meta = read_toy_metadata(path)
    out = {
        "model": name,
        "weights": str(path),
        "steps": json.loads(meta.get("steps", "null")),
        "images_seen": json.loads(meta.get("images_seen", "null")),
        "image_macs": image_tower_macs(name),
        "zero_shot": zero_shot_eval(model, tokenizer, world, n_per_class, seed),
        "zero_shot_plain": zero_shot_eval(model, tokenizer, world, n_per_class, seed, shifted=False),
    }
    if speed:
        out["images_per_s"] = round(image_throughput(model), 1)
        out["threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="promptkd toy zero-shot", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=toy_model_names(), help="toy model names (default: both)")
    p.add_argument("--weights", default=None, help="a weights file instead of the shipped one (one model)")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-speed", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for name in a.models:
        print(json.dumps(report(name, a.weights, a.n_per_class, a.seed, speed=not a.no_speed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
