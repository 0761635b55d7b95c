"""One small training engine shared by the teacher and distillation stages.

Names are resolved on first use, so that importing `promptkd.engine.config` (the settings the
CLI checks) does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {"TrainConfig": "promptkd.engine.config", "TrainResult": "promptkd.engine.loop",
         "lr_at_epoch": "promptkd.engine.loop", "train_loop": "promptkd.engine.loop",
         "distributed": "promptkd.engine.distributed"}

__all__ = ["TrainConfig", "TrainResult", "lr_at_epoch", "train_loop"]


def __getattr__(name: str):
    if name == "distributed":
        return importlib.import_module(_LAZY[name])
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'promptkd.engine' has no attribute {name!r}")
