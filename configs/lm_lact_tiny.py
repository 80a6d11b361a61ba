"""The tiny LM with LaCT layers (large-chunk test-time training, arXiv 2505.23884).

    python -m lcx.main --config configs/lm_lact_tiny.py --workdir runs/lm_lact_tiny
    python -m lcx.main --config configs/lm_lact_tiny.py:smoke --workdir /tmp/smoke

Every layer mixes with LaCT + a sliding window of attention (the paper's hybrid layer):
fast weights updated once per 256-token chunk, attention within 256 tokens, on packed
rows of 1,024 tokens. `--config.model.block_pattern="('lact', 'attention')"` alternates
with full attention instead. Everything else as configs/lm_tiny.py.
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")


def get_config(arg=None):
    """`arg`: None for the full run, 'smoke' for a seconds-long CPU run."""
    c = load_config(BASE, arg)
    c.model.block_pattern = ("lact",)
    c.model.lact.fw_heads = 2
    if arg == "smoke":
        c.model.lact.update(chunk_size=16, window=16)
    else:
        c.train.update(batch_size=4, seq_len=1024)
        c.model.lact.update(chunk_size=256, window=256)
    return c
