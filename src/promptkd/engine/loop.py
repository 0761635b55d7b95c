"""The training loop both stages share: SGD + constant warm-up + cosine (stepped per epoch, as the
official Dassl schedule), mixed precision with fp32 master weights, DDP, exact resume, progress
and metrics.

Exact resume works because nothing random is hidden: the batch order is a permutation drawn from
(seed, epoch), each sample's augmentation is drawn from (seed, epoch, index) by the dataset, and
the optimiser state, step position and RNG states are all in the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import promptkd.engine.distributed as distributed
from promptkd.artifacts import atomic_open, load_artifact, save_artifact
from promptkd.engine.config import CHECKPOINT_NAME, TrainConfig
from promptkd.errors import PromptKDError, raise_if_interrupted

log = logging.getLogger(__name__)

# The fast path reads step results (loss, logs, finiteness) back to the host once per this many
# steps, at epoch ends and before checkpoints: the GPU never waits for the host in between.
SYNC_EVERY = 32


def resolve_device(name: str | None = "auto") -> torch.device:
    """auto (CUDA, else MPS, else CPU) or a named device that exists here; anything else is one line."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise PromptKDError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise PromptKDError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PromptKDError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise PromptKDError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def lr_at_epoch(epoch: int, cfg: TrainConfig) -> float:
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs)) with warm-up recount.

    Official ViT configs: epoch 0 runs at 1e-5, then 0.5*lr*(1+cos(pi*(e-1)/epochs)).
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches from a (seed, epoch) permutation; each rank takes its contiguous slice.

    A 2-rank run therefore sees exactly the global batches of a 1-rank run, and resuming at step
    k just skips the first k batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise PromptKDError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def num_steps(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __len__(self) -> int:
        return max(self.num_steps() - self.start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.batch_size // self.world_size
        for step in range(self.start_step, self.num_steps()):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]


class Stateful(Protocol):
    """Extra training state that must survive a resume (e.g. the teacher's prompt aggregate)."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    steps: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all persistent buffers (BN running stats), by name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _rng_state() -> dict[str, Any]:
    return {
        "python": _jsonable_py_state(random.getstate()),
        "numpy": [int(x) for x in np.random.get_state()[1]],
        "numpy_pos": int(np.random.get_state()[2]),
    }


def _jsonable_py_state(state):
    return [state[0], list(state[1]), state[2]]


def _restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta.get("rng", {}).get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in meta.get("rng", {}):
        np.random.set_state(("MT19937", np.array(meta["rng"]["numpy"], dtype=np.uint32), meta["rng"]["numpy_pos"], 0, 0.0))
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                    result: TrainResult, cfg: TrainConfig, scaler, extra: list[Stateful], meta_extra: dict) -> None:
    tensors = {f"model.{k}": v for k, v in _trainable_state(model).items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{name_of[id(p)]}"] = buf
    tensors["rng.torch"] = torch.get_rng_state()
    for i, s in enumerate(extra):
        tensors.update({f"extra{i}.{k}": v for k, v in s.state_tensors().items()})
    meta = {
        "kind": "checkpoint",
        "epoch": epoch,
        "step": step,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "seconds": result.seconds,
        "history": result.history,
        "config": asdict(cfg),
        "rng": _rng_state(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        **meta_extra,
    }
    save_artifact(path, tensors, meta)


def _check_checkpoint_meta(meta: dict, path: Path) -> None:
    """A checkpoint's metadata must have the types this loop wrote (a damaged file says so)."""
    for key in ("epoch", "step", "steps", "skipped_steps"):
        value = meta.get(key, 0)
        if type(value) is not int or value < 0:
            raise PromptKDError(f"{path}: checkpoint metadata '{key}' must be a non-negative integer, got {value!r}")
    for key, kind in (("config", dict), ("history", list), ("rng", dict), ("partial", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise PromptKDError(f"{path}: checkpoint metadata '{key}' must be a JSON {kind.__name__}")
    if not isinstance(meta.get("seconds", 0.0), (int, float)):
        raise PromptKDError(f"{path}: checkpoint metadata 'seconds' must be a number")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                    extra: list[Stateful], cfg: TrainConfig) -> tuple[int, int, TrainResult, dict]:
    tensors, meta = load_artifact(path, kind="checkpoint")
    _check_checkpoint_meta(meta, path)
    saved_cfg = meta.get("config", {})
    for key in ("epochs", "batch_size", "lr", "seed", "precision"):
        if key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
            raise PromptKDError(
                f"{path}: cannot resume: checkpoint was written with {key}={saved_cfg[key]!r}, "
                f"this run has {key}={getattr(cfg, key)!r}"
            )
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = _trainable_state(model)
    if set(state) != set(own):
        diff = sorted(set(state) ^ set(own))
        raise PromptKDError(f"{path}: checkpoint does not match this model (differs in {diff[:4]})")
    params = dict(model.named_parameters())
    shapes = {**{k: own[k].shape for k in own}, **{f"optim.{k}": p.shape for k, p in params.items()}}
    for k, v in [*state.items(), *((k, v) for k, v in tensors.items() if k.startswith("optim."))]:
        if k not in shapes or v.shape != shapes[k]:
            raise PromptKDError(f"{path}: checkpoint tensor {k} has shape {tuple(v.shape)}, this model has "
                                f"{tuple(shapes[k]) if k in shapes else 'no such tensor'}")
    _restore(model, state)
    for k, v in tensors.items():
        if k.startswith("optim."):
            p = params[k.removeprefix("optim.")]
            optimizer.state[p]["momentum_buffer"] = v.to(p.device).clone()
    for i, s in enumerate(extra):
        prefix = f"extra{i}."
        s.load_state_tensors({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    if meta.get("scaler") and scaler is not None:
        scaler.load_state_dict(meta["scaler"])
    try:
        _restore_rng(meta, tensors)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise PromptKDError(f"{path}: checkpoint holds a corrupt RNG state ({e})") from None
    result = TrainResult(meta.get("history", []), meta.get("steps", 0), meta.get("skipped_steps", 0), meta.get("seconds", 0.0))
    return int(meta["epoch"]), int(meta["step"]), result, meta


class MetricsLog:
    """metrics.jsonl on the main process, plus TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        # Opened once, line-buffered: every record still reaches the file when it is written.
        self.file = open(self.path, "a") if enabled else None
        if self.file is not None:
            self.file.reconfigure(line_buffering=True)
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard is optional (but a Ctrl-C that cut its import short is not lost)
                raise_if_interrupted()
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('event', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def trim_metrics_log(path: Path, steps: int) -> None:
    """Keep only the records of the first `steps` steps (what a resumed checkpoint has done).

    A run killed after its last checkpoint logged steps that the resumed run repeats, and a kill
    mid-append can leave a torn last line; both are dropped so the log reads as one clean run.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= steps
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
        if keep:
            kept.append(line + "\n")
    with atomic_open(path, "w") as f:
        f.writelines(kept)


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _non_finite_grads(params: list[nn.Parameter]) -> bool:
    """One device sync per step, not one per parameter."""
    return bool(_non_finite_grads_flag(params))


def _non_finite_grads_flag(params: list[nn.Parameter]) -> torch.Tensor:
    """A 0-dim bool tensor on the device: any NaN/inf gradient (no host sync)."""
    finite = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return ~torch.stack(finite).all() if finite else torch.zeros((), dtype=torch.bool, device=params[0].device)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with the official settings; fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    kind = {"fused": True} if params[0].device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=lr_at_epoch(0, cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           **kind)


def resolve_compile(cfg: TrainConfig, device: torch.device, default: bool, distributed_run: bool) -> bool:
    """`compile`: on / off as asked; auto: on for CUDA where the caller's step is known to compile
    correctly (`default`, e.g. distillation from a teacher cache) and not under data parallel."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return default and device.type == "cuda" and not distributed_run


def compile_loss(loss_fn: Callable, device: torch.device) -> Callable:
    """torch.compile of a loss function with static shapes; on CUDA with CUDA graphs
    ("reduce-overhead"), which replay the whole forward and backward as one launch each."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(loss_fn, mode=mode, dynamic=False)


def _compiled_step_works(step_loss: Callable, batch: tuple, params: list, buffers: list, device: torch.device,
                         cfg: TrainConfig) -> bool:
    """Run the compiled step's forward and backward once on the first batch, then undo it (buffers
    restored, gradients dropped). Compiling happens here, where a failure (no Triton or C compiler,
    an operation the compiler cannot handle) can still fall back to eager (`compile: auto`: False,
    with a warning) or stop in one line (`on`), instead of dying inside a step."""
    saved = _copy_buffers(buffers)
    try:
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, cfg.precision):
            loss, _ = step_loss(batch)
        loss.backward()
        return True
    except (torch.cuda.OutOfMemoryError, PromptKDError):
        raise  # not the compiler's fault: eager would fail the same way
    except Exception as e:
        raise_if_interrupted()  # a Ctrl-C that cut the compiler's imports short is no compiler failure
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        if cfg.compile == "on":
            raise PromptKDError(f"torch.compile failed on the training step ({reason}); "
                                "run with --compile off (or auto)") from e
        log.warning("torch.compile failed on the training step (%s); training without it "
                    "(--compile off skips the attempt)", reason)
        return False
    finally:
        _put_back(buffers, saved)
        for p in params:
            p.grad = None


def _copy_buffers(buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    """The persistent buffers' values (BatchNorm statistics move in a forward pass), for _put_back."""
    return [b.detach().clone() for b in buffers]


@torch.no_grad()
def _put_back(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for b, s in zip(buffers, saved):
        b.copy_(s)


@dataclass
class _Pending:
    """One fast-path step whose results are still on the device."""

    epoch: int
    step: int  # index in the epoch
    global_step: int
    lr: float
    keys: list[str]
    values: torch.Tensor  # loss, logs..., bad (a non-finite loss or gradient), as one fp32 vector


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[tuple], tuple[torch.Tensor, dict]],
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[int], dict] | None = None,
    extra_state: list[Stateful] | None = None,
    desc: str = "train",
    checkpoint_meta: dict | None = None,
    compile_default: bool = False,
) -> TrainResult:
    """Train the parameters of `model` that require grad, by SGD on `loss_fn(batch)`.

    `model` must already be on its device. `loss_fn` gets a batch whose tensors are on that
    device and returns (loss, scalar logs). `dataset` returns (image, label, index) and has
    `set_epoch(e)` so its augmentation depends on (seed, epoch, index) only. Under torchrun each
    rank takes its slice of every global batch and gradients are averaged across ranks in one
    flat all-reduce (the trainable prompts and projector are small, so bucketing buys nothing).
    `on_epoch_end(epoch)` runs after each epoch (validation, prompt aggregation) and its dict is
    logged. A checkpoint is written after every epoch (and every `checkpoint_every` steps).
    A dataset with `set_on_bad_image` / `unreadable_count` (data.dataset.ImageDataset) gets
    `cfg.on_bad_image`, and its count of unreadable images is logged in the epoch record.
    A non-finite loss or gradient stops the run naming the step (the checkpoint on disk is the
    last good one) or, with on_nonfinite="skip", leaves weights, optimiser and buffers untouched.

    With on_nonfinite="stop" (outside fp16) the step never waits for the host: losses, logs and a
    finiteness flag stay on the device and are read back every SYNC_EVERY steps, at each epoch end
    and before each checkpoint. A NaN/inf is then found up to SYNC_EVERY - 1 steps late; the run
    stops naming its step, nothing from that step on is logged, and no checkpoint is written past
    it. "skip" and fp16 (GradScaler) check every step. `cfg.compile` (resolve_compile; auto follows
    `compile_default`) runs `loss_fn` through torch.compile, with CUDA graphs on CUDA; the first step
    tries it and falls back to eager (auto) or stops in one line (on) if it cannot compile.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = list(extra_state or [])
    if callable(getattr(dataset, "set_on_bad_image", None)):  # what an unreadable image does (data.dataset)
        dataset.set_on_bad_image(cfg.on_bad_image)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dist_info = distributed.current()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PromptKDError("nothing to train: no parameter requires grad")
    if any(p.dtype != torch.float32 for p in params):
        raise PromptKDError("trainable parameters must be fp32 master weights (use precision= for mixed precision)")
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    fast = cfg.on_nonfinite == "stop" and cfg.precision != "fp16"
    compiled = resolve_compile(cfg, device, compile_default, dist_info.enabled)
    step_loss = compile_loss(loss_fn, device) if compiled else loss_fn
    graphs = compiled and device.type == "cuda"
    untried = compiled

    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, True, cfg.drop_last,
                                dist_info.rank, dist_info.world_size)
    if sampler.num_steps() == 0:
        raise PromptKDError(f"dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
    steps_per_epoch = sampler.num_steps() if cfg.max_steps_per_epoch is None else min(sampler.num_steps(), cfg.max_steps_per_epoch)

    ckpt_path = out_dir / CHECKPOINT_NAME
    start_epoch, start_step, result, partial = 0, 0, TrainResult(), {}
    if resume:
        if not ckpt_path.is_file():
            raise PromptKDError(f"--resume: no checkpoint at {ckpt_path}")
        start_epoch, start_step, result, meta = load_checkpoint(ckpt_path, model, optimizer, scaler, extra, cfg)
        partial = (meta.get("partial") or {}) if start_step else {}
        if dist_info.is_main:
            trim_metrics_log(out_dir / "metrics.jsonl", result.steps)
        log.info("resuming from %s at epoch %d step %d", ckpt_path, start_epoch, start_step)
    elif dist_info.is_main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()

    if dist_info.enabled:  # every rank starts from rank 0's trainable state
        for t in _trainable_state(model).values():
            torch.distributed.broadcast(t, src=0)

    metrics = MetricsLog(out_dir, dist_info.is_main)
    # Persistent buffers (BatchNorm statistics) change in the forward pass; a skipped batch must not.
    own_state = model.state_dict(keep_vars=True)
    buffers = [b for n, b in model.named_buffers() if n in own_state]
    t_start = time.perf_counter() - result.seconds
    snapshot = _snapshot if fast else lambda _model: None  # only a fast-path stop rolls back to a kept state
    good = snapshot(model)  # the last checkpointed state
    t_here = time.perf_counter()  # this process's start, for the ETA
    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at_epoch(epoch, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
            # RNG, so a mid-epoch resume (a new loader after the RNG restore) would draw once more.
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda", persistent_workers=False,
                                generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            model.train()
            sums: dict[str, float] = dict(partial.get("sums", {})) if epoch == start_epoch else {}
            n_logged = int(partial.get("n", 0)) if epoch == start_epoch else 0
            bar = _progress(total=steps_per_epoch, initial=first, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                            enabled=cfg.progress and dist_info.is_main)
            log_ = _EpochLog(metrics, bar, sums, n_logged)
            for step, batch in enumerate(loader, start=first):
                if step >= steps_per_epoch:
                    break
                batch = tuple(b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
                if untried:  # the first step of this process compiles; a failure is handled there
                    untried = False
                    if not _compiled_step_works(step_loss, batch, params, buffers, device, cfg):
                        step_loss, graphs = loss_fn, False
                if graphs:  # the previous step's graph outputs may be overwritten from here on
                    torch.compiler.cudagraph_mark_step_begin()
                saved_buffers = _copy_buffers(buffers) if cfg.on_nonfinite == "skip" else None
                with autocast(device, cfg.precision):
                    loss, logs = step_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                log_.images += batch[0].shape[0] * dist_info.world_size
                if fast:
                    loss.backward()
                    if dist_info.enabled:
                        _average_gradients(params, dist_info.world_size)
                    bad_flag = ~torch.isfinite(loss.detach()).all() | _non_finite_grads_flag(params)
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    values = [loss.detach().float().reshape(()), *(torch.as_tensor(v, device=device).detach()
                                                                    .float().reshape(()) for v in logs.values())]
                    log_.pending.append(_Pending(epoch, step, result.steps, lr, ["loss", *logs],
                                                 torch.stack([*values, bad_flag.float()])))
                    if len(log_.pending) >= SYNC_EVERY:
                        log_.flush(dist_info.enabled)
                else:
                    bad = not torch.isfinite(loss.detach()).all()
                    if dist_info.enabled:  # every rank must take the same branch, or the all-reduce hangs
                        flag = torch.tensor([float(bad)], device=device)
                        torch.distributed.all_reduce(flag)
                        bad = bool(flag.item() > 0)
                    if not bad:
                        scaler.scale(loss).backward()
                        if dist_info.enabled:
                            _average_gradients(params, dist_info.world_size)
                        if cfg.precision != "fp16":  # fp16 overflow is the scaler's job
                            bad = _non_finite_grads(params)
                    if bad:
                        if cfg.on_nonfinite == "stop":
                            raise _NonFinite(epoch, step, result.steps)
                        where = f"epoch {epoch + 1} step {step + 1} (global step {result.steps})"
                        log.warning("skipping batch with non-finite loss/gradients at %s", where)
                        optimizer.zero_grad(set_to_none=True)
                        _put_back(buffers, saved_buffers)
                        result.skipped_steps += 1
                    else:
                        if cfg.grad_clip:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        scaler.step(optimizer)
                        scaler.update()
                    log_.record(epoch, result.steps, lr,
                                {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}, bad)
                bar.update(1)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                    log_.flush(dist_info.enabled)  # never checkpoint past a non-finite step
                    result.seconds = time.perf_counter() - t_start
                    good = snapshot(model)
                    if dist_info.is_main:
                        save_checkpoint(ckpt_path, model, optimizer, epoch, step + 1, result, cfg, scaler, extra,
                                        {**(checkpoint_meta or {}), "partial": {"sums": log_.sums, "n": log_.n}})
            log_.flush(dist_info.enabled)
            n_logged = log_.n
            bar.close()
            model.eval()
            seconds = time.perf_counter() - log_.t0  # the epoch's steps, data loading included
            record = {"epoch": epoch + 1, "lr": lr, **{k: v / max(n_logged, 1) for k, v in sums.items()},
                      "seconds": seconds, "images_per_s": log_.images / max(seconds, 1e-9)}
            if result.skipped_steps:
                record["skipped_steps"] = result.skipped_steps
            unreadable = getattr(dataset, "unreadable_count", None)
            if callable(unreadable) and unreadable():
                record["unreadable_images"] = unreadable()
                log.warning("%d unreadable image(s) so far were replaced by the next readable one "
                            "(on_bad_image='error' makes this fatal)", record["unreadable_images"])
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch) or {})
            result.history.append(record)
            result.seconds = time.perf_counter() - t_start
            metrics.write({"event": "epoch", "step": result.steps, **record})
            if dist_info.is_main:
                per_epoch = (time.perf_counter() - t_here) / (epoch + 1 - start_epoch)
                log.info(epoch_line(desc, record, cfg.epochs, per_epoch * (cfg.epochs - epoch - 1)))
            good = snapshot(model)
            if dist_info.is_main:
                save_checkpoint(ckpt_path, model, optimizer, epoch + 1, 0, result, cfg, scaler, extra, checkpoint_meta or {})
            distributed.barrier()
    except _NonFinite as e:
        if fast:  # later steps ran on: give the caller the last good weights, not NaNs
            _restore(model, good)
        kept = f"The last good checkpoint is kept at {ckpt_path}" if ckpt_path.is_file() else \
            "No checkpoint was written yet"
        raise PromptKDError(
            f"non-finite loss or gradients at {e}; stopped. {kept} (on_nonfinite='skip', --on-nonfinite skip on "
            "the command line, skips such batches instead)") from None
    finally:
        metrics.close()
    return result


def epoch_line(desc: str, record: dict, epochs: int, eta_seconds: float) -> str:
    """One line per epoch, kept on screen and in logs: loss, lr, validation score, time and ETA."""
    parts = [f"{desc} epoch {record['epoch']}/{epochs}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4g}")
    parts.append(f"lr {record['lr']:.2e}")
    for key in ("val", "val_acc"):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"val {record[key]:.2f}")
    parts.append(f"{record['seconds']:.1f} s ({record['images_per_s']:.0f} img/s)")
    if record["epoch"] < epochs:
        m, sec = divmod(int(round(eta_seconds)), 60)
        parts.append(f"ETA {m // 60}:{m % 60:02d}:{sec:02d}")
    return "  ".join(parts)


class _NonFinite(Exception):
    def __init__(self, epoch: int, step: int, global_step: int):
        super().__init__(f"epoch {epoch + 1} step {step + 1} (global step {global_step})")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in _trainable_state(model).items()}


@torch.no_grad()
def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    full = model.state_dict()
    for k, v in state.items():
        full[k].copy_(v)


class _EpochLog:
    """The step records of one epoch: metrics.jsonl lines, the progress bar, sums for the epoch means,
    and the fast path's steps whose results are still on the device (`pending`, see flush)."""

    def __init__(self, metrics: MetricsLog, bar, sums: dict[str, float], n: int):
        self.metrics, self.bar, self.sums, self.n = metrics, bar, sums, n
        self.t0, self.images = time.perf_counter(), 0
        self.pending: list[_Pending] = []

    def record(self, epoch: int, global_step: int, lr: float, logs: dict, bad: bool) -> None:
        if bad:  # a skipped batch is logged as such and kept out of the epoch means
            logs["skipped"] = True
        else:
            for k, v in logs.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.n += 1
        ips = self.images / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        self.metrics.write({"event": "step", "epoch": epoch, "step": global_step, "lr": lr, **logs})

    def flush(self, distributed_run: bool) -> None:
        """Read the pending steps back (one sync), log them in order; raise _NonFinite at a bad one."""
        if not self.pending:
            return
        values = torch.stack([p.values for p in self.pending])
        if distributed_run:  # every rank stops at the same step
            flags = values[:, -1].contiguous()
            torch.distributed.all_reduce(flags)
            values[:, -1] = flags
        done, self.pending = self.pending, []
        for p, row in zip(done, values.tolist()):
            if row[-1] > 0:
                raise _NonFinite(p.epoch, p.step, p.global_step)
            self.record(p.epoch, p.global_step, p.lr, dict(zip(p.keys, row[:-1])), False)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from promptkd.logs import progress_bar

    return progress_bar(total=total, initial=initial, desc=desc, enabled=enabled, leave=False)
