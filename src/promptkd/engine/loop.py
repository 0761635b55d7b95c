"""The training loop both stages share: SGD + constant warm-up + cosine (stepped per epoch, as the
official Dassl schedule), mixed precision with fp32 master weights, DDP, exact resume, progress
and metrics.

Exact resume works because nothing random is hidden: the batch order is a permutation drawn from
(seed, epoch), each sample's augmentation is drawn from (seed, epoch, index) by the dataset, and
the optimiser state, step position and RNG states are all in the checkpoint (engine.checkpoint).

`train_loop` reads top to bottom: set-up, resume, then per epoch its steps, its record and its
checkpoint. The phases are the named methods of `_Training`, which holds one call's state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import promptkd.engine.distributed as distributed
from promptkd.artifacts import atomic_open
from promptkd.engine.checkpoint import (
    Stateful,
    TrainResult,
    load_checkpoint,
    read_header,
    restore,
    save_checkpoint,
    snapshot,
    trainable_state,
)
from promptkd.engine.config import CHECKPOINT_NAME, METRICS_LOG_NAME, TENSORBOARD_DIR, TrainConfig
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


class MetricsLog:
    """metrics.jsonl on the main process, plus TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / METRICS_LOG_NAME
        # Opened once, line-buffered: every record still reaches the file when it is written.
        self.file = open(self.path, "a") if enabled else None
        if self.file is not None:
            self.file.reconfigure(line_buffering=True)
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
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
    """The mean gradient over ranks, in one flat all-reduce (the trainable prompts and projector
    are small, so bucketing buys nothing)."""
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
    resume_header: dict | None = None,
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
    rank takes its slice of every global batch (EpochBatchSampler). `on_epoch_end(epoch)` runs
    after each epoch (validation, prompt aggregation) and its dict is logged. A checkpoint is
    written after every epoch (and every `checkpoint_every` steps), with `extra_state` in it and
    `checkpoint_meta` in its header; `resume` continues from it, once its header allows it
    (engine.checkpoint.read_header: the stage passes the header it checked, with its own settings, as
    `resume_header`; without one the loop checks the engine's settings itself). A dataset with
    `set_on_bad_image` / `unreadable_count` (data.dataset.ImageDataset) gets `cfg.on_bad_image`,
    and its count of unreadable images is logged in the epoch record. A non-finite loss or
    gradient stops the run naming the step (`_Training.fast_update`) or, with on_nonfinite="skip",
    is skipped (`_Training.checked_update`). `cfg.compile` (resolve_compile; auto follows
    `compile_default`) runs `loss_fn` through torch.compile (`_Training.try_compile`).
    """
    run = _Training(model, loss_fn, dataset, cfg, Path(out_dir), list(extra_state or []), desc,
                    checkpoint_meta or {}, compile_default)
    if resume:
        run.resume(resume_header)
    elif run.dist.is_main and (run.out_dir / METRICS_LOG_NAME).exists():
        (run.out_dir / METRICS_LOG_NAME).unlink()
    run.start()
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            loader = run.begin_epoch(epoch)
            for step, batch in enumerate(loader, start=run.first_step):
                if step >= run.steps_per_epoch:
                    break
                run.train_step(epoch, step, batch)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < run.steps_per_epoch:
                    run.checkpoint(epoch, step + 1)
            run.end_epoch(epoch, on_epoch_end)
            run.checkpoint(epoch + 1, 0)
            distributed.barrier()
    except _NonFinite as e:
        raise run.stopped(e) from None
    finally:
        run.metrics.close()
    return run.result


class _Training:
    """One train_loop call's state and its named phases: set-up (__init__, resume, start), the
    epoch (begin_epoch, train_step with its two update paths and the compile attempt, end_epoch)
    and checkpoint."""

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset: Dataset, cfg: TrainConfig, out_dir: Path,
                 extra: list[Stateful], desc: str, checkpoint_meta: dict, compile_default: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.loss_fn, self.dataset, self.cfg, self.out_dir = model, loss_fn, dataset, cfg, out_dir
        self.extra, self.desc, self.checkpoint_meta = extra, desc, checkpoint_meta
        if callable(getattr(dataset, "set_on_bad_image", None)):  # what an unreadable image does (data.dataset)
            dataset.set_on_bad_image(cfg.on_bad_image)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.dist = distributed.current()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise PromptKDError("nothing to train: no parameter requires grad")
        if any(p.dtype != torch.float32 for p in self.params):
            raise PromptKDError("trainable parameters must be fp32 master weights (use precision= for mixed precision)")
        self.optimizer = make_optimizer(self.params, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.fast = cfg.on_nonfinite == "stop" and cfg.precision != "fp16"
        compiled = resolve_compile(cfg, self.device, compile_default, self.dist.enabled)
        self.step_loss = compile_loss(loss_fn, self.device) if compiled else loss_fn
        self.graphs = compiled and self.device.type == "cuda"
        self.untried = compiled  # the compiled step is tried on the first batch (try_compile)
        self.sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, True, cfg.drop_last,
                                         self.dist.rank, self.dist.world_size)
        if self.sampler.num_steps() == 0:
            raise PromptKDError(f"dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
        self.steps_per_epoch = (self.sampler.num_steps() if cfg.max_steps_per_epoch is None
                                else min(self.sampler.num_steps(), cfg.max_steps_per_epoch))
        self.ckpt_path = out_dir / CHECKPOINT_NAME
        self.start_epoch, self.start_step, self.result, self.partial = 0, 0, TrainResult(), {}

    def resume(self, checked: dict | None) -> None:
        """Continue from the checkpoint: weights, optimiser, RNGs, position, and the log trimmed to it.
        `checked`: its header, already checked by the caller (read_header); None: checked here."""
        if not self.ckpt_path.is_file():
            raise PromptKDError(f"--resume: no checkpoint at {self.ckpt_path}")
        if checked is None:
            read_header(self.ckpt_path, self.cfg)
        self.start_epoch, self.start_step, self.result, meta = load_checkpoint(
            self.ckpt_path, self.model, self.optimizer, self.scaler, self.extra)
        self.partial = (meta.get("partial") or {}) if self.start_step else {}
        if self.dist.is_main:
            trim_metrics_log(self.out_dir / METRICS_LOG_NAME, self.result.steps)
        log.info("resuming from %s at epoch %d step %d", self.ckpt_path, self.start_epoch, self.start_step)

    def start(self) -> None:
        """Same weights on every rank, the metrics log opened, the clocks and the last good state set."""
        if self.dist.enabled:  # every rank starts from rank 0's trainable state
            for t in trainable_state(self.model).values():
                torch.distributed.broadcast(t, src=0)
        self.metrics = MetricsLog(self.out_dir, self.dist.is_main)
        # Persistent buffers (BatchNorm statistics) change in the forward pass; a skipped batch must not.
        own_state = self.model.state_dict(keep_vars=True)
        self.buffers = [b for n, b in self.model.named_buffers() if n in own_state]
        self.t_start = time.perf_counter() - self.result.seconds
        self.good = snapshot(self.model) if self.fast else None  # the last checkpointed state (fast path only)
        self.t_here = time.perf_counter()  # this process's start, for the ETA

    def begin_epoch(self, epoch: int) -> DataLoader:
        """Set the epoch's learning rate, batch order and augmentation, and its step log; returns its loader."""
        self.lr = lr_at_epoch(epoch, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        self.first_step = self.start_step if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, self.first_step)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # RNG, so a mid-epoch resume (a new loader after the RNG restore) would draw once more.
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch))
        self.model.train()
        partial = self.partial if epoch == self.start_epoch else {}  # a resumed epoch's sums so far
        bar = _progress(total=self.steps_per_epoch, initial=self.first_step, desc=f"{self.desc} {epoch + 1}/{self.cfg.epochs}",
                        enabled=self.cfg.progress and self.dist.is_main)
        self.epoch_log = _EpochLog(self.metrics, bar, dict(partial.get("sums", {})), int(partial.get("n", 0)))
        return loader

    def train_step(self, epoch: int, step: int, batch: tuple) -> None:
        """Forward (compiled where it compiles), then the fast or the checked update."""
        batch = tuple(b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
        if self.untried:  # the first step of this process compiles; a failure is handled there
            self.try_compile(batch)
        if self.graphs:  # the previous step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        saved_buffers = _copy_buffers(self.buffers) if self.cfg.on_nonfinite == "skip" else None
        with autocast(self.device, self.cfg.precision):
            loss, logs = self.step_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.result.steps += 1
        self.epoch_log.images += batch[0].shape[0] * self.dist.world_size
        if self.fast:
            self.fast_update(epoch, step, loss, logs)
        else:
            self.checked_update(epoch, step, loss, logs, saved_buffers)
        self.epoch_log.bar.update(1)

    def try_compile(self, batch: tuple) -> None:
        """Compile on the first batch (_compiled_step_works); where that fails under `compile: auto`,
        every step runs eagerly from here on (and without CUDA graphs)."""
        self.untried = False
        if not _compiled_step_works(self.step_loss, batch, self.params, self.buffers, self.device, self.cfg):
            self.step_loss, self.graphs = self.loss_fn, False

    def fast_update(self, epoch: int, step: int, loss: torch.Tensor, logs: dict) -> None:
        """The update that never waits for the host (on_nonfinite="stop", outside fp16).

        Loss, logs and a finiteness flag stay on the device and are read back every SYNC_EVERY
        steps, at each epoch end and before each checkpoint (_EpochLog.flush). A NaN/inf is then
        found up to SYNC_EVERY - 1 steps late; the run stops naming its step, nothing from that
        step on is logged, no checkpoint is written past it, and the weights roll back to the last
        checkpointed state (stopped).
        """
        loss.backward()
        if self.dist.enabled:
            _average_gradients(self.params, self.dist.world_size)
        bad_flag = ~torch.isfinite(loss.detach()).all() | _non_finite_grads_flag(self.params)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        values = [loss.detach().float().reshape(()), *(torch.as_tensor(v, device=self.device).detach()
                                                        .float().reshape(()) for v in logs.values())]
        self.epoch_log.pending.append(_Pending(epoch, step, self.result.steps, self.lr, ["loss", *logs],
                                               torch.stack([*values, bad_flag.float()])))
        if len(self.epoch_log.pending) >= SYNC_EVERY:
            self.epoch_log.flush(self.dist.enabled)

    def checked_update(self, epoch: int, step: int, loss: torch.Tensor, logs: dict, saved_buffers) -> None:
        """The update that checks every step (on_nonfinite="skip", or fp16 with its GradScaler).

        A non-finite loss or gradient stops the run naming the step (the checkpoint on disk is the
        last good one) or, with "skip", leaves weights, optimiser and buffers untouched.
        """
        bad = not torch.isfinite(loss.detach()).all()
        if self.dist.enabled:  # every rank must take the same branch, or the all-reduce hangs
            flag = torch.tensor([float(bad)], device=self.device)
            torch.distributed.all_reduce(flag)
            bad = bool(flag.item() > 0)
        if not bad:
            self.scaler.scale(loss).backward()
            if self.dist.enabled:
                _average_gradients(self.params, self.dist.world_size)
            if self.cfg.precision != "fp16":  # fp16 overflow is the scaler's job
                bad = _non_finite_grads(self.params)
        if bad:
            if self.cfg.on_nonfinite == "stop":
                raise _NonFinite(epoch, step, self.result.steps)
            where = f"epoch {epoch + 1} step {step + 1} (global step {self.result.steps})"
            log.warning("skipping batch with non-finite loss/gradients at %s", where)
            self.optimizer.zero_grad(set_to_none=True)
            _put_back(self.buffers, saved_buffers)
            self.result.skipped_steps += 1
        else:
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.epoch_log.record(epoch, self.result.steps, self.lr,
                              {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}, bad)

    def end_epoch(self, epoch: int, on_epoch_end: Callable[[int], dict] | None) -> None:
        """The epoch's record (means, speed, skipped and unreadable counts, `on_epoch_end`'s dict):
        into the history, metrics.jsonl and one line of the log."""
        record = self._epoch_record(epoch)
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch) or {})
        self.result.history.append(record)
        self.result.seconds = time.perf_counter() - self.t_start
        self.metrics.write({"event": "epoch", "step": self.result.steps, **record})
        if self.dist.is_main:
            per_epoch = (time.perf_counter() - self.t_here) / (epoch + 1 - self.start_epoch)
            log.info(epoch_line(self.desc, record, self.cfg.epochs, per_epoch * (self.cfg.epochs - epoch - 1)))

    def _epoch_record(self, epoch: int) -> dict:
        epoch_log = self.epoch_log
        epoch_log.flush(self.dist.enabled)
        epoch_log.bar.close()
        self.model.eval()
        seconds = time.perf_counter() - epoch_log.t0  # the epoch's steps, data loading included
        record = {"epoch": epoch + 1, "lr": self.lr, **{k: v / max(epoch_log.n, 1) for k, v in epoch_log.sums.items()},
                  "seconds": seconds, "images_per_s": epoch_log.images / max(seconds, 1e-9)}
        if self.result.skipped_steps:
            record["skipped_steps"] = self.result.skipped_steps
        unreadable = getattr(self.dataset, "unreadable_count", None)
        if callable(unreadable) and unreadable():
            record["unreadable_images"] = unreadable()
            log.warning("%d unreadable image(s) so far were replaced by the next readable one "
                        "(on_bad_image='error' makes this fatal)", record["unreadable_images"])
        return record

    def checkpoint(self, epoch: int, step: int) -> None:
        """Checkpoint at (epoch, step) on the main process and keep this state as the last good one.
        Mid-epoch (step > 0) the pending steps are read first, so no checkpoint is written past a
        non-finite step, and the header keeps the epoch's sums so far."""
        meta = self.checkpoint_meta
        if step:
            self.epoch_log.flush(self.dist.enabled)
            self.result.seconds = time.perf_counter() - self.t_start
            meta = {**meta, "partial": {"sums": self.epoch_log.sums, "n": self.epoch_log.n}}
        self.good = snapshot(self.model) if self.fast else None
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, self.model, self.optimizer, epoch, step, self.result, self.cfg,
                            self.scaler, self.extra, meta)

    def stopped(self, e: _NonFinite) -> PromptKDError:
        """The one-line error of a non-finite stop; the fast path's later steps ran on, so the model
        gets the last good weights back, not NaNs."""
        if self.fast:
            restore(self.model, self.good)
        kept = f"The last good checkpoint is kept at {self.ckpt_path}" if self.ckpt_path.is_file() else \
            "No checkpoint was written yet"
        return PromptKDError(
            f"non-finite loss or gradients at {e}; stopped. {kept} (on_nonfinite='skip', --on-nonfinite skip on "
            "the command line, skips such batches instead)")


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
