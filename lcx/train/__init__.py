"""Training: mesh and shardings, the jitted step, checkpoints, metrics and the loop."""

from lcx.train.loop import evaluate_checkpoint, train_and_evaluate
from lcx.train.step import TrainState, lm_loss

__all__ = ["TrainState", "evaluate_checkpoint", "lm_loss", "train_and_evaluate"]
