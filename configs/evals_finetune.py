"""Teach a pretrained tiny model the lcx.evals task formats from short examples only.

    python -m lcx.main --config configs/lm_tiny.py --workdir runs/lm_tiny
    python -m lcx.main --config configs/lm_tiny.py --workdir runs/lm_tiny \
        --config.mode=export --config.export.dir=runs/lm_tiny_hf
    python -m lcx.evals.finetune --out runs/task_data --count 3000
    python -m lcx.main --config configs/evals_finetune.py --workdir runs/lm_tiny_tasks \
        --config.init.hf_checkpoint=runs/lm_tiny_hf --config.data.paths=runs/task_data
    python -m lcx.main --config configs/evals_finetune.py --workdir runs/lm_tiny_tasks \
        --config.init.hf_checkpoint=runs/lm_tiny_hf --config.data.paths=runs/task_data \
        --config.mode=evaluate

Fine-tuning on 256-512-token examples (rows of 512, packed), 200 steps at a tenth of
pretraining's peak rate; then `mode=evaluate` scores 1K-4K prompts, longer than any
fine-tuning example (ProLong, arXiv 2410.02660: short instruction data suffices).
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")


def get_config(arg=None):
    """`arg`: None for the recipe, 'smoke' for a seconds-long CPU run (both need
    --config.init.hf_checkpoint and --config.data.paths)."""
    c = load_config(BASE, arg)
    c.train.update(steps=200, batch_size=8, seq_len=512, eval_every=100, checkpoint_every=100)
    c.schedule.update(peak_lr=2e-4, warmup_steps=20)
    c.data.update(packing="first_fit", eval_fraction=0.05)
    c.model.dtype = "float32"  # lm_tiny's checkpoint, run as exported
    if arg == "smoke":
        c.train.update(steps=3, batch_size=4, seq_len=256, eval_every=3, checkpoint_every=3)
        c.schedule.warmup_steps = 1
        c.evals.update(lengths="256", examples=2, context=512, position_length=512, documents=4)
    return c
