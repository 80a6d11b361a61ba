"""Optimizers for large and changing batches, as optax transformations and schedules.

LAMB (arXiv 1904.00962), AdaGrad / AdaGrad-Norm and AdAdaGrad's batch-size tests and
controller (arXiv 2402.11215), the Power scheduler (arXiv 2408.13359).
"""

from lcx.optim.adagrad import adagrad, adagrad_norm, scale_by_adagrad_norm
from lcx.optim.batch_tests import (
    GradientStats,
    augmented_inner_product_test,
    inner_product_test,
    norm_test,
    orthogonality_test,
    projections_from_samples,
    stats_add,
    stats_all_reduce,
    stats_from_samples,
    stats_init,
    stats_merge,
    suggested_batch_sizes,
)
from lcx.optim.controller import AdaptiveBatchConfig
from lcx.optim.lamb import lamb, matrices_only
from lcx.optim.schedules import (
    cosine_schedule,
    current_learning_rate,
    power_schedule,
    token_scheduled,
    wsd_schedule,
)

__all__ = [
    "AdaptiveBatchConfig",
    "GradientStats",
    "adagrad",
    "adagrad_norm",
    "augmented_inner_product_test",
    "cosine_schedule",
    "current_learning_rate",
    "inner_product_test",
    "lamb",
    "matrices_only",
    "norm_test",
    "orthogonality_test",
    "projections_from_samples",
    "power_schedule",
    "scale_by_adagrad_norm",
    "stats_add",
    "stats_all_reduce",
    "stats_from_samples",
    "stats_init",
    "stats_merge",
    "suggested_batch_sizes",
    "token_scheduled",
    "wsd_schedule",
]
