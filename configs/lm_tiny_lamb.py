"""The tiny LM with LAMB and the Power scheduler (arXiv 1904.00962, arXiv 2408.13359).

    python -m lcx.main --config configs/lm_tiny_lamb.py --workdir runs/lm_tiny_lamb
    python -m lcx.main --config configs/lm_tiny_lamb.py:smoke --workdir /tmp/smoke

Everything else as configs/lm_tiny.py. The power law lr = batch * a * n^b stays above
the cap for this short run, so the rate is the cap until the final exponential decay.
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")


def get_config(arg=None):
    """`arg`: None for the full run, 'smoke' for a seconds-long CPU run."""
    c = load_config(BASE, arg)
    c.optimizer.name = "lamb"
    c.optimizer.lamb.update(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01)
    c.schedule.power.update(a=4.0, b=-0.51)
    c.schedule.update(
        name="power",
        peak_lr=0.01,  # max_lr
        decay="exponential",
        decay_steps=max(1, c.train.steps // 10),
        final_lr_fraction=0.0,
    )
    return c
