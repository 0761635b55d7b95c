"""One small training engine shared by the teacher and distillation stages."""

from promptkd.engine.loop import TrainConfig, TrainResult, lr_at_epoch, train_loop

__all__ = ["TrainConfig", "TrainResult", "lr_at_epoch", "train_loop"]
