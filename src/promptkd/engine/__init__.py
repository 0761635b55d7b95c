"""One small training engine shared by the teacher and distillation stages.

Names are resolved on first use, so that importing `promptkd.engine.config` (the settings the
CLI checks) does not import torch.
"""

from __future__ import annotations

from promptkd.lazy import lazy_attributes

_LAZY = {"TrainConfig": "promptkd.engine.config", "TrainResult": "promptkd.engine.loop",
         "lr_at_epoch": "promptkd.engine.loop", "train_loop": "promptkd.engine.loop",
         "distributed": "promptkd.engine.distributed"}

__all__ = ["TrainConfig", "TrainResult", "lr_at_epoch", "train_loop"]
__getattr__ = lazy_attributes(__name__, _LAZY)
