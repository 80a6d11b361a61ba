"""AdAdaGrad's batch-size controller (Lau et al., 2024, arXiv 2402.11215).

Every `test_interval` steps the chosen test suggests b*, and the batch grows:
b <- min(b_max, max(b, ceil(b*))), rounded up to whole micro-batches. The training loop
realises b as gradient-accumulation micro-steps of a fixed micro-batch, so the compiled
step never changes shape. The current b lives in the train state (and so in every
checkpoint).
"""

from __future__ import annotations

import dataclasses
import math

from lcx.errors import UserError

TESTS = ("norm", "inner_product", "augmented_inner_product")


@dataclasses.dataclass(frozen=True)
class AdaptiveBatchConfig:
    """When and how far the batch grows."""

    micro_batch_size: int
    max_batch_size: int
    test: str = "augmented_inner_product"
    eta: float = 0.1
    theta: float = 0.1
    nu: float = 0.1
    test_interval: int = 10
    groups_per_micro_batch: int = 4  # gradient samples per micro-step for the statistics

    def __post_init__(self):
        if self.test not in TESTS:
            raise UserError(f"batch.test={self.test!r}; valid: {TESTS}")
        for name in ("micro_batch_size", "max_batch_size", "test_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"batch.{name}={getattr(self, name)} must be positive")
        if self.max_batch_size % self.micro_batch_size:
            raise UserError(
                f"batch.max_batch_size={self.max_batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.micro_batch_size % self.groups_per_micro_batch:
            raise UserError(
                f"batch.groups_per_micro_batch={self.groups_per_micro_batch} must divide "
                f"micro_batch_size={self.micro_batch_size}"
            )
        for name in ("eta", "theta", "nu"):
            if getattr(self, name) <= 0:
                raise UserError(f"batch.{name}={getattr(self, name)} must be positive")

    def is_test_step(self, step: int) -> bool:
        return step % self.test_interval == 0

    def next_batch_size(self, batch_size: int, suggested: float) -> int:
        """min(b_max, max(b, ceil(b*))) in whole micro-batches; NaN/inf suggest nothing."""
        if not math.isfinite(suggested):
            return batch_size
        target = max(batch_size, math.ceil(suggested))
        target = self.micro_batch_size * math.ceil(target / self.micro_batch_size)
        return min(self.max_batch_size, target)
