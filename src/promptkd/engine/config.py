"""Training settings, importable without torch (the CLI checks them before any heavy import)."""

from __future__ import annotations

from dataclasses import dataclass

from promptkd.errors import PromptKDError
from promptkd.settings import check_field_types, check_ranges

CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_LOG_NAME = "metrics.jsonl"  # one JSON line per step and per epoch
TENSORBOARD_DIR = "tensorboard"  # written when tensorboard is installed
# Every file the engine (promptkd.engine.loop) writes into the folder it trains in: a run folder's
# list of outputs is composed from these, the run's own files and the stage's artifacts (runs.run_outputs).
ENGINE_FILES = (CHECKPOINT_NAME, METRICS_LOG_NAME, TENSORBOARD_DIR)
COMPILE_MODES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the official PromptKD/PromptSRC ViT configs."""

    epochs: int = 20
    batch_size: int = 8  # global batch (split across DDP ranks)
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast, master weights stay fp32
    seed: int = 1
    num_workers: int = 0
    drop_last: bool = True
    grad_clip: float | None = None
    on_nonfinite: str = "stop"  # stop | skip
    on_bad_image: str = "substitute"  # substitute (next readable image, counted) | error
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: end of epoch only)
    max_steps_per_epoch: int | None = None  # cap, for quick runs
    device: str = "auto"
    progress: bool = True
    compile: str = "auto"  # auto | on | off: torch.compile the loss (CUDA graphs on CUDA); see train_loop

    def __post_init__(self):
        if isinstance(self.compile, bool):  # YAML reads a bare on/off as a boolean
            self.compile = "on" if self.compile else "off"
        check_field_types(self, "train settings")
        if self.compile not in COMPILE_MODES:
            raise PromptKDError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise PromptKDError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise PromptKDError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.on_bad_image not in ("substitute", "error"):
            raise PromptKDError(f"on_bad_image must be 'substitute' or 'error', got {self.on_bad_image!r}")
        check_ranges(self, "train settings", {
            "epochs": (">=", 1), "batch_size": (">=", 1), "lr": (">", 0), "momentum": (">=", 0),
            "weight_decay": (">=", 0), "warmup_epochs": (">=", 0), "warmup_lr": (">", 0), "num_workers": (">=", 0),
            "grad_clip": (">", 0), "checkpoint_every": (">=", 0), "max_steps_per_epoch": (">=", 1)})
