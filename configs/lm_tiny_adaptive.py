"""The tiny LM with AdAdaGrad's adaptive batch size on AdamW (arXiv 2402.11215).

    python -m lcx.main --config configs/lm_tiny_adaptive.py --workdir runs/lm_tiny_adaptive
    python -m lcx.main --config configs/lm_tiny_adaptive.py:smoke --workdir /tmp/smoke

Starts at 8 sequences per step in micro-batches of 8 and grows (more accumulation
micro-steps, same compiled shapes) up to 64 when the augmented inner-product test says
the gradient noise dominates. The schedule runs on tokens, so it stays right as the
batch grows.
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")


def get_config(arg=None):
    """`arg`: None for the full run, 'smoke' for a seconds-long CPU run."""
    c = load_config(BASE, arg)
    smoke = arg == "smoke"
    c.train.update(batch_size=4 if smoke else 8, micro_batch_size=4 if smoke else 8)
    c.batch.update(
        adaptive=True,
        test="augmented_inner_product",
        theta=0.1,
        nu=0.1,
        test_interval=2 if smoke else 10,
        max_batch_size=8 if smoke else 64,
        groups_per_micro_batch=2 if smoke else 4,
    )
    return c
