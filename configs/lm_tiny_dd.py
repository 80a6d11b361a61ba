"""The tiny LM with Dataset Decomposition (arXiv 2405.13226): variable-length rows.

    python -m lcx.main --config configs/lm_tiny_dd.py --workdir runs/lm_tiny_dd
    python -m lcx.main --config configs/lm_tiny_dd.py:smoke --workdir /tmp/smoke

Documents are cut into power-of-two chunks (64 to 1,024 tokens here), one chunk per
row: no padding and no attention across documents. Each step draws one bucket by the
Grow-P2 curriculum and trains on 4,096 tokens as [4096 / 2^k, 2^k]; one step compiles
per bucket shape. The schedule runs on tokens seen.
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")


def get_config(arg=None):
    """`arg`: None for the full run, 'smoke' for a seconds-long CPU run."""
    c = load_config(BASE, arg)
    c.data.packing = "dd"
    if arg == "smoke":  # seq_len 64, batch 4: 256 tokens per step, rows of 16 to 64
        c.data.dd.update(min_log2=4, max_log2=6)
    else:
        c.train.update(batch_size=4, seq_len=1024)
        c.data.dd.update(min_log2=6, max_log2=10, curriculum="grow_p2", cycles=2)
    return c
