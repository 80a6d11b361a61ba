"""Continued long-context training of a pretrained model, in the manner of ProLong.

    python -m lcx.main --config configs/continue_long.py --workdir runs/continue_long \
        --config.init.hf_checkpoint=/models/Llama-3.2-1B --config.data.paths=/data/code
    python -m lcx.main --config configs/continue_long.py --workdir runs/continue_long \
        --config.mode=export --config.export.dir=/models/Llama-3.2-1B-64K
    python -m lcx.main --config configs/continue_long.py:smoke --workdir /tmp/smoke \
        --config.init.hf_checkpoint=DIR   # a tiny local checkpoint; seconds

ProLong (Gao et al., arXiv 2410.02660) continues Llama-3-8B on 64K rows, then 512K,
with the RoPE base raised (500K -> 8M at 64K), a mix of long documents (whole code
repositories and books) and short ones, document masking, lr 1e-5 with cosine decay
and 4M-token batches. Here: the imported checkpoint's architecture and tokenizer, rows of
64K tokens packed first-fit with per-document attention, RoPE base 8M, long documents
made from the files of each top-level directory of `data.paths` joined in path order
(repository-level code) mixed with the files at its root as short documents.
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")


def get_config(arg=None):
    """`arg`: None for the full run, 'smoke' for a seconds-long CPU run (both need
    --config.init.hf_checkpoint)."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/continue_long.py takes no argument or 'smoke'; got {arg!r}")
    smoke = arg == "smoke"
    c = load_config(BASE, "smoke" if smoke else None)
    c.init.rope_theta = 8_000_000.0
    c.data.update(tokenizer="checkpoint", join_directories=True, packing="first_fit")
    c.train.update(steps=5_000, batch_size=64, seq_len=65_536, eval_every=500,
                   checkpoint_every=250, keep_checkpoints=3)  # fmt: skip
    c.optimizer.update(name="adamw", grad_clip=1.0)
    c.optimizer.adamw.update(b1=0.9, b2=0.95, weight_decay=0.1)
    c.schedule.update(name="cosine", peak_lr=1e-5, warmup_steps=500, final_lr_fraction=0.1)
    c.mesh.update(data=1, fsdp=-1)
    c.model.update(dtype="bfloat16", remat="dots")
    if smoke:
        # The smoke checkpoint comes from configs/lm_tiny.py:smoke (byte tokenizer, RoPE
        # base 10,000): rows four times longer, the base raised four times.
        c.init.rope_theta = 40_000.0
        c.data.update(tokenizer="bytes", max_documents=60)
        c.train.update(steps=3, batch_size=4, seq_len=256, eval_every=3, checkpoint_every=3,
                       log_every=1)  # fmt: skip
        c.schedule.update(peak_lr=1e-4, warmup_steps=1)
        c.model.update(dtype="float32", remat="none")
    return c
