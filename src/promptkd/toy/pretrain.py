"""Contrastive pretraining of the toy CLIPs on the toy world's captions.

``pretrain("toy-teacher", out_dir, seed=0, steps=N)`` trains from a seeded random
initialisation on an endless stream of freshly rendered (image, caption) pairs and
writes trimmed safetensors weights (``<out_dir>/<name>.safetensors``), periodic
checkpoints, and a JSON-lines log with the domain zero-shot accuracy as it goes.

The loss is CLIP's symmetric cross-entropy, with one change that matters for a world
with few distinct captions: a caption counts as a positive for every image in the batch
it is true of (``World.caption_matches``), with the target mass spread evenly over them,
instead of treating identical descriptions of other images as negatives.

With ``steps`` a run is reproducible bit for bit on the same machine and library
versions; with ``minutes`` the step count is set from the speed measured over the first
steps (and logged), so it depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from promptkd.artifacts import atomic_open
from promptkd.metrics import harmonic_mean
from promptkd.toy.models import (
    PREPROCESS_CFG,
    create_toy_model,
    image_tower_macs,
    save_toy_weights,
    toy_model_names,
    toy_weights_path,
)
from promptkd.toy.world import World, _seed_of

ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float normalised as the models' preprocess config says."""
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def class_text_features(model, tokenizer, classnames, templates=ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """Normalised text features (C, D), averaged over templates."""
    feats = []
    for name in classnames:
        f = model.encode_text(tokenizer([t.format(name) for t in templates]))
        f = F.normalize(f, dim=-1).mean(0)
        feats.append(F.normalize(f, dim=-1))
    return torch.stack(feats)


@torch.no_grad()
def zero_shot_eval(model, tokenizer, world: World | None = None, n_per_class: int = 50, seed: int = 0,
                   templates=ZERO_SHOT_TEMPLATES, shifted: bool = True, batch_size: int = 500) -> dict:
    """Base / novel / HM accuracy (%) on the domain test split, official base-to-novel protocol.

    Base images are classified among the base classes only and novel among the novel
    ones. ``shifted=False`` renders the same classes in the pretraining style instead,
    to tell apart what the model knows from how well it transfers.
    """
    world = world or World(0)
    was_training = model.training
    model.eval()
    names = world.domain_classnames()
    text = class_text_features(model, tokenizer, names, templates)
    if shifted:
        images, labels = world.domain_split("test", n_per_class, seed)
    else:
        g = torch.Generator().manual_seed(_seed_of("plain-test", world.seed, seed))
        labels = torch.arange(world.n_classes).repeat_interleave(n_per_class)
        images = world.domain_batch(labels, g, shifted=False)
    feats = torch.cat([F.normalize(model.encode_image(normalize_images(images[i:i + batch_size])), dim=-1)
                       for i in range(0, len(images), batch_size)])
    m = world.n_base
    logits = feats @ text.T
    base = labels < m
    pred_base = logits[base][:, :m].argmax(1)
    pred_novel = logits[~base][:, m:].argmax(1) + m
    acc_base = (pred_base == labels[base]).float().mean().item() * 100
    acc_novel = (pred_novel == labels[~base]).float().mean().item() * 100
    all_acc = (logits.argmax(1) == labels).float().mean().item() * 100
    hm = harmonic_mean(acc_base, acc_novel)
    model.train(was_training)
    return {"base": round(acc_base, 2), "novel": round(acc_novel, 2), "hm": round(hm, 2), "all": round(all_acc, 2)}


def contrastive_loss(image_features, text_features, logit_scale, matches) -> torch.Tensor:
    """Symmetric CLIP loss with every true caption/image of the batch as a positive."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    m = matches.float()
    target_i2t = m / m.sum(1, keepdim=True)
    target_t2i = m.T / m.T.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target_i2t) + F.cross_entropy(logits.T, target_t2i))


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # as in open_clip_train: no decay on gains, biases, embeddings and the logit scale
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(which: str, out_dir: str | Path, seed: int = 0, minutes: float | None = None,
             steps: int | None = None, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
             warmup_steps: int = 200, threads: int | None = None, eval_every_s: float = 300,
             checkpoint_every_s: float = 600, deadline_minutes: float | None = None,
             eval_n_per_class: int = 50, stop_after_steps: int | None = None, ship: bool = False,
             log=print) -> dict:
    """Pretrain ``which`` ('toy-teacher' | 'toy-student') and return a summary dict.

    Give ``steps`` (reproducible) or ``minutes`` (steps derived from measured speed).
    ``deadline_minutes`` stops at that wall time and still writes weights; the learning
    rate schedule then runs on whichever comes first, the steps or the deadline (the
    step count reached is logged; only a run that ends on its steps is bit-reproducible).
    ``stop_after_steps`` ends the run early on the schedule of ``steps`` (the weights are
    then those of that step of the full run: a cheaper, less trained model).
    ``ship=True`` also copies the final weights into the package assets.
    """
    if which in ("teacher", "student"):
        which = f"toy-{which}"
    if which not in toy_model_names():
        raise ValueError(f"which must be one of {toy_model_names()}")
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{which}.log.jsonl"

    def emit(record):
        record = {"time": round(time.time() - t0, 1), **record}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(json.dumps(record))

    torch.manual_seed(seed)
    model = create_toy_model(which)
    model.train()
    import open_clip

    tokenizer = open_clip.get_tokenizer(which)
    world = World(seed)
    gen = torch.Generator().manual_seed(_seed_of("pretrain", seed))
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    t0 = time.time()
    emit({"event": "start", "model": which, "seed": seed, "batch_size": batch_size, "lr": lr,
          "steps": steps, "minutes": minutes, "image_macs": image_tower_macs(which),
          "params": sum(p.numel() for p in model.parameters())})
    total = steps if steps is not None else 10**9
    step, images_seen, last_eval, last_ckpt = 0, 0, t0, t0
    calib_start = None
    loss_ema = None
    meta = {"seed": seed, "batch_size": batch_size, "lr": lr}

    def save(path):
        return save_toy_weights(model, path, which, {**meta, "steps": step, "images_seen": images_seen})

    while step < total:
        if stop_after_steps is not None and step >= stop_after_steps:
            emit({"event": "stop_after_steps", "step": step})
            break
        if deadline_minutes is not None and time.time() - t0 > deadline_minutes * 60:
            emit({"event": "deadline", "step": step})
            break
        frac = step / max(1, total)
        if deadline_minutes is not None:
            # Anneal by the deadline even when the machine turns out slower than planned.
            frac = max(frac, (time.time() - t0) / (deadline_minutes * 60))
        cur_lr = lr * min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        images, captions, true_attrs, said_attrs = world.pretrain_batch(batch_size, gen, return_attributes=True)
        matches = World.caption_matches(true_attrs, said_attrs)
        img_f = model.encode_image(normalize_images(images))
        txt_f = model.encode_text(tokenizer(captions))
        loss = contrastive_loss(img_f, txt_f, model.logit_scale, matches)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        images_seen += batch_size
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()

        if minutes is not None and total == 10**9:
            # Set the schedule length from the speed of steps 10..40.
            if step == 10:
                calib_start = time.time()
            elif step == 40:
                per_step = (time.time() - calib_start) / 30
                total = max(50, int((minutes * 60 - (time.time() - t0)) / per_step) + step)
                emit({"event": "schedule", "steps": total, "sec_per_step": round(per_step, 4),
                      "images_per_s": round(batch_size / per_step, 1)})
        now = time.time()
        if step % 50 == 0:
            emit({"event": "train", "step": step, "loss": round(loss_ema, 4), "lr": round(cur_lr, 6),
                  "logit_scale": round(model.logit_scale.exp().item(), 2),
                  "images_per_s": round(images_seen / (now - t0), 1)})
        if eval_every_s and now - last_eval > eval_every_s:
            last_eval = now
            emit({"event": "eval", "step": step, "zero_shot": zero_shot_eval(model, tokenizer, world, eval_n_per_class),
                  "zero_shot_plain": zero_shot_eval(model, tokenizer, world, eval_n_per_class, shifted=False)})
        if checkpoint_every_s and now - last_ckpt > checkpoint_every_s:
            last_ckpt = now
            save(out_dir / f"{which}-step{step:06d}.safetensors")
            save(out_dir / f"{which}-latest.safetensors")

    zs = zero_shot_eval(model, tokenizer, world, eval_n_per_class)
    zs_plain = zero_shot_eval(model, tokenizer, world, eval_n_per_class, shifted=False)
    meta["zero_shot"] = zs
    final = save(out_dir / f"{which}.safetensors")
    summary = {"event": "done", "model": which, "steps": step, "images_seen": images_seen,
               "minutes": round((time.time() - t0) / 60, 2), "zero_shot": zs, "zero_shot_plain": zs_plain,
               "loss": round(loss_ema or float("nan"), 4), "weights": str(final)}
    if ship:
        with atomic_open(toy_weights_path(which), "wb") as f:  # never a half-copied asset
            f.write(Path(final).read_bytes())
        summary["shipped"] = str(toy_weights_path(which))
    emit(summary)
    model.eval()
    return summary


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["teacher", "student", *toy_model_names()])
    p.add_argument("--out", default="runs/toy-pretrain", help="output folder (weights, checkpoints, log)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int, help="optimiser steps (reproducible)")
    g.add_argument("--minutes", type=float, help="wall-clock budget; steps set from measured speed")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--eval-every", type=float, default=300, help="seconds between zero-shot evaluations (0: none)")
    p.add_argument("--checkpoint-every", type=float, default=600, help="seconds between checkpoints (0: none)")
    p.add_argument("--deadline-minutes", type=float, default=None, help="stop early at this wall time")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop at this step of the --steps schedule (a less trained model)")
    p.add_argument("--eval-n-per-class", type=int, default=50, help="domain test images per class for evaluations")
    p.add_argument("--ship", action="store_true", help="copy the final weights into the package assets")


def _run(a) -> int:
    from promptkd.errors import PromptKDError

    for flag, value in (("--steps", a.steps), ("--minutes", a.minutes), ("--batch-size", a.batch_size),
                        ("--stop-after-steps", a.stop_after_steps), ("--deadline-minutes", a.deadline_minutes)):
        if value is not None and value <= 0:
            raise PromptKDError(f"{flag} must be positive, got {value}")
    if a.stop_after_steps is not None and (a.steps is None or a.stop_after_steps > a.steps):
        raise PromptKDError("--stop-after-steps needs --steps and must not exceed it")
    pretrain(a.which, a.out, seed=a.seed, minutes=a.minutes, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
             weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, threads=a.threads,
             eval_every_s=a.eval_every, checkpoint_every_s=a.checkpoint_every,
             deadline_minutes=a.deadline_minutes, eval_n_per_class=a.eval_n_per_class,
             stop_after_steps=a.stop_after_steps, ship=a.ship)
    return 0


def _run_domain(a) -> int:
    from promptkd.errors import PromptKDError
    from promptkd.toy.world import custom_classnames

    if min(a.n_train, a.n_val, a.n_test) < 0:
        raise PromptKDError("--n-train, --n-val and --n-test must be >= 0")
    if a.n_classes is not None and a.classes:
        raise PromptKDError("give --n-classes or --classes, not both")
    split = Path(a.out) / "split_zhou_Toy.json"
    if split.exists() and not a.overwrite:
        raise PromptKDError(f"{split} exists; pass --overwrite to write the domain again")
    names = None
    if a.classes:
        names = [c.strip() for c in a.classes.split(",") if c.strip()]
    elif a.n_classes is not None:
        names = custom_classnames(a.n_classes)
    world = World(a.seed, classnames=names)
    root = world.write_domain(a.out, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, seed=a.seed)
    print(f"{root}: {world.n_classes} classes ({world.n_base} base), --dataset split:{split} --root {root / 'images'}")
    return 0


def _add_domain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (images/ and split_zhou_Toy.json)")
    p.add_argument("--n-train", type=int, default=64, help="train images per class (default 64)")
    p.add_argument("--n-val", type=int, default=8, help="val images per class (default 8)")
    p.add_argument("--n-test", type=int, default=50, help="test images per class (default 50)")
    p.add_argument("--seed", type=int, default=0, help="the world's and the splits' seed")
    p.add_argument("--n-classes", type=int, metavar="N",
                   help="N classes drawn from the world's words instead of the 24 demo classes")
    p.add_argument("--classes", help="comma-separated class names, e.g. 'red circle,blue striped star'")
    p.add_argument("--overwrite", action="store_true", help="write over an existing domain folder")


def register(sub) -> None:
    """`promptkd toy pretrain ...` and `promptkd toy domain ...`."""
    toy = sub.add_parser("toy", help="the embedded toy world: pretrain its tiny CLIPs, write its domains",
                         description="Tools for the offline toy world (see docs/toy-world.md).")
    toy.set_defaults(func=lambda _args: toy.print_help() or 2)
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", parser_class=type(toy))
    p = toy_sub.add_parser("pretrain", help="contrastive pretraining of toy-teacher or toy-student",
                           description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=_run)
    d = toy_sub.add_parser("domain", help="write a toy domain as a CoOp-style dataset (images + split file)",
                           description="The demo's 24-class domain, or one with other classes of the same style, "
                                       "for `--dataset split:DIR/split_zhou_Toy.json --root DIR/images`.")
    _add_domain_arguments(d)
    d.set_defaults(func=_run_domain)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="promptkd toy pretrain", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
