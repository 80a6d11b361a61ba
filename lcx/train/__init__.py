"""Training: the jitted step, checkpoints, metrics and the loop (the mesh and sharding rules
are lcx.runtime's)."""

from lcx.train.loop import evaluate_checkpoint, train_and_evaluate
from lcx.train.step import TrainState, lm_loss

__all__ = ["TrainState", "evaluate_checkpoint", "lm_loss", "train_and_evaluate"]
