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

import json
import math
import time
from dataclasses import dataclass
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
_UNCALIBRATED = 10**9  # the step count of a `minutes` run until its speed is measured


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


class _JsonLog:
    """The run's JSON-lines log, each record stamped with seconds since the run started; also echoed."""

    def __init__(self, path: Path, echo):
        self.path, self.echo, self.t0 = path, echo, time.time()

    def __call__(self, record: dict) -> None:
        record = {"time": round(time.time() - self.t0, 1), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.echo(json.dumps(record))


@dataclass
class _Progress:
    """Where a pretraining run stands (what the loop updates and the checks and saves read)."""

    total: int
    last_eval: float
    last_ckpt: float
    step: int = 0
    images_seen: int = 0
    calib_start: float | None = None
    loss_ema: float | None = None
    lr: float = 0.0


def _check_args(which: str, steps, minutes) -> str:
    if which in ("teacher", "student"):
        which = f"toy-{which}"
    if which not in toy_model_names():
        raise ValueError(f"which must be one of {toy_model_names()}")
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    return which


def _lr_at(run: _Progress, lr: float, warmup_steps: int, deadline_minutes, t0: float) -> float:
    """Linear warm-up, then cosine decay over the steps (or the deadline, when that comes first)."""
    frac = run.step / max(1, run.total)
    if deadline_minutes is not None:
        # Anneal by the deadline even when the machine turns out slower than planned.
        frac = max(frac, (time.time() - t0) / (deadline_minutes * 60))
    return lr * min(1.0, (run.step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _train_step(model, opt, tokenizer, world: World, gen, batch_size: int, run: _Progress) -> None:
    """One contrastive step on a freshly rendered batch, at the learning rate `run.lr`."""
    for group in opt.param_groups:
        group["lr"] = run.lr
    images, captions, true_attrs, said_attrs = world.pretrain_batch(batch_size, gen, return_attributes=True)
    matches = World.caption_matches(true_attrs, said_attrs)
    img_f = model.encode_image(normalize_images(images))
    txt_f = model.encode_text(tokenizer(captions))
    loss = contrastive_loss(img_f, txt_f, model.logit_scale, matches)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    run.step += 1
    run.images_seen += batch_size
    run.loss_ema = loss.item() if run.loss_ema is None else 0.98 * run.loss_ema + 0.02 * loss.item()


def _calibrate(run: _Progress, minutes: float, batch_size: int, emit: _JsonLog) -> None:
    """With `minutes`: set the schedule length from the speed of steps 10..40."""
    if run.step == 10:
        run.calib_start = time.time()
    elif run.step == 40:
        per_step = (time.time() - run.calib_start) / 30
        run.total = max(50, int((minutes * 60 - (time.time() - emit.t0)) / per_step) + run.step)
        emit({"event": "schedule", "steps": run.total, "sec_per_step": round(per_step, 4),
              "images_per_s": round(batch_size / per_step, 1)})


def _save(model, path: Path, which: str, meta: dict, run: _Progress) -> Path:
    return save_toy_weights(model, path, which, {**meta, "steps": run.step, "images_seen": run.images_seen})


def _report(model, tokenizer, world, run: _Progress, emit: _JsonLog, out_dir: Path, which: str, meta: dict,
            eval_every_s, checkpoint_every_s, eval_n_per_class: int) -> None:
    """The periodic train line, zero-shot evaluation and checkpoints after a step."""
    now = time.time()
    if run.step % 50 == 0:
        emit({"event": "train", "step": run.step, "loss": round(run.loss_ema, 4), "lr": round(run.lr, 6),
              "logit_scale": round(model.logit_scale.exp().item(), 2),
              "images_per_s": round(run.images_seen / (now - emit.t0), 1)})
    if eval_every_s and now - run.last_eval > eval_every_s:
        run.last_eval = now
        emit({"event": "eval", "step": run.step, "zero_shot": zero_shot_eval(model, tokenizer, world, eval_n_per_class),
              "zero_shot_plain": zero_shot_eval(model, tokenizer, world, eval_n_per_class, shifted=False)})
    if checkpoint_every_s and now - run.last_ckpt > checkpoint_every_s:
        run.last_ckpt = now
        _save(model, out_dir / f"{which}-step{run.step:06d}.safetensors", which, meta, run)
        _save(model, out_dir / f"{which}-latest.safetensors", which, meta, run)


def _stop_early(run: _Progress, stop_after_steps, deadline_minutes, emit: _JsonLog) -> bool:
    if stop_after_steps is not None and run.step >= stop_after_steps:
        emit({"event": "stop_after_steps", "step": run.step})
        return True
    if deadline_minutes is not None and time.time() - emit.t0 > deadline_minutes * 60:
        emit({"event": "deadline", "step": run.step})
        return True
    return False


def _finish(model, tokenizer, world, run: _Progress, emit: _JsonLog, out_dir: Path, which: str, meta: dict,
            eval_n_per_class: int, ship: bool) -> dict:
    """Final zero-shot accuracy, the weights (shipped into the package assets with `ship`), the summary."""
    zs = zero_shot_eval(model, tokenizer, world, eval_n_per_class)
    zs_plain = zero_shot_eval(model, tokenizer, world, eval_n_per_class, shifted=False)
    meta["zero_shot"] = zs
    final = _save(model, out_dir / f"{which}.safetensors", which, meta, run)
    summary = {"event": "done", "model": which, "steps": run.step, "images_seen": run.images_seen,
               "minutes": round((time.time() - emit.t0) / 60, 2), "zero_shot": zs, "zero_shot_plain": zs_plain,
               "loss": round(run.loss_ema or float("nan"), 4), "weights": str(final)}
    if ship:
        with atomic_open(toy_weights_path(which), "wb") as f:  # never a half-copied asset
            f.write(Path(final).read_bytes())
        summary["shipped"] = str(toy_weights_path(which))
    emit(summary)
    model.eval()
    return summary


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
    which = _check_args(which, steps, minutes)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    model = create_toy_model(which)
    model.train()
    import open_clip

    tokenizer = open_clip.get_tokenizer(which)
    world = World(seed)
    gen = torch.Generator().manual_seed(_seed_of("pretrain", seed))
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    emit = _JsonLog(out_dir / f"{which}.log.jsonl", log)
    emit({"event": "start", "model": which, "seed": seed, "batch_size": batch_size, "lr": lr,
          "steps": steps, "minutes": minutes, "image_macs": image_tower_macs(which),
          "params": sum(p.numel() for p in model.parameters())})
    run = _Progress(total=steps if steps is not None else _UNCALIBRATED, last_eval=emit.t0, last_ckpt=emit.t0)
    meta = {"seed": seed, "batch_size": batch_size, "lr": lr}
    while run.step < run.total and not _stop_early(run, stop_after_steps, deadline_minutes, emit):
        run.lr = _lr_at(run, lr, warmup_steps, deadline_minutes, emit.t0)
        _train_step(model, opt, tokenizer, world, gen, batch_size, run)
        if minutes is not None and run.total == _UNCALIBRATED:
            _calibrate(run, minutes, batch_size, emit)
        _report(model, tokenizer, world, run, emit, out_dir, which, meta, eval_every_s, checkpoint_every_s,
                eval_n_per_class)
    return _finish(model, tokenizer, world, run, emit, out_dir, which, meta, eval_n_per_class, ship)
