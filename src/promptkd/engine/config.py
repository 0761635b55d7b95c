"""Training settings, importable without torch (the CLI checks them before any heavy import).

Each field is a `settings.setting`: its help, choices and range are the checks of YAML and --set and
the options of the commands that offer it (DistillConfig's and TeacherConfig's `train` section)."""

from __future__ import annotations

from dataclasses import dataclass

from promptkd.options import PRESET_DEFAULT
from promptkd.settings import setting, validate

CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_LOG_NAME = "metrics.jsonl"  # one JSON line per step and per epoch
TENSORBOARD_DIR = "tensorboard"  # written when tensorboard is installed
# Every file the engine (promptkd.engine.loop) writes into the folder it trains in: a run folder's
# list of outputs is composed from these, the run's own files and the stage's artifacts (runs.run_outputs).
ENGINE_FILES = (CHECKPOINT_NAME, METRICS_LOG_NAME, TENSORBOARD_DIR)
COMPILE_MODES = ("auto", "on", "off")
NONFINITE_ACTIONS = ("stop", "skip")
BAD_IMAGE_ACTIONS = ("substitute", "error")


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the official PromptKD/PromptSRC ViT configs."""

    epochs: int = setting(20, help=f"training epochs {PRESET_DEFAULT}", range=(">=", 1))
    batch_size: int = setting(8, help=f"images per step, global across processes {PRESET_DEFAULT}",
                              range=(">=", 1))  # split across DDP ranks
    lr: float = setting(0.005, help=f"learning rate, > 0 {PRESET_DEFAULT}", range=(">", 0))
    momentum: float = setting(0.9, help="SGD momentum", range=(">=", 0))
    weight_decay: float = setting(5e-4, help="SGD weight decay", range=(">=", 0))
    warmup_epochs: int = setting(1, help="epochs of constant warm-up learning rate", range=(">=", 0))
    warmup_lr: float = setting(1e-5, help="the warm-up learning rate", range=(">", 0))
    precision: str = setting("fp32", help="autocast dtype; master weights stay fp32",
                             choices=("fp32", "bf16", "fp16"))
    seed: int = setting(1, help="the run's seed: few-shot draw, initialisation, batch order, weights of "
                                f"--*-weights none {PRESET_DEFAULT}")
    num_workers: int = setting(0, help=f"data-loader processes {PRESET_DEFAULT}", range=(">=", 0))
    drop_last: bool = True
    grad_clip: float | None = setting(None, help="clip the gradients' norm to this", range=(">", 0))
    on_nonfinite: str = setting("stop", help="NaN/inf loss or gradients: stop (default) or skip the batch",
                                choices=NONFINITE_ACTIONS)
    on_bad_image: str = setting("substitute", choices=BAD_IMAGE_ACTIONS,
                                help="unreadable training image: use the next readable one (default, counted) or stop")
    checkpoint_every: int = setting(0, help="also checkpoint every N steps (for --resume)", metavar="STEPS",
                                    range=(">=", 0))  # 0: at the end of each epoch only
    max_steps_per_epoch: int | None = setting(None, help="cap the steps of each epoch (quick runs)", metavar="N",
                                              range=(">=", 1))
    device: str = setting("auto", flag="--device", global_option=True, help="the device")
    progress: bool = setting(True, flag="--no-progress", global_option=True, help="progress bars")
    compile: str = setting("auto", choices=COMPILE_MODES,
                           help="torch.compile the training step (CUDA graphs on CUDA); auto (default): on for "
                                "--teacher-cache runs on one CUDA GPU")  # see train_loop

    def __post_init__(self):
        if isinstance(self.compile, bool):  # YAML reads a bare on/off as a boolean
            self.compile = "on" if self.compile else "off"
        validate(self, "train settings")
