"""About 1B parameters on 32K-token packed rows, for a TPU v5e/v5p slice.

    # on every host of the slice (JAX finds the others; no distributed flags on TPU):
    python -m lcx.main --config configs/lm_1b_tpu.py --workdir gs://BUCKET/runs/lm_1b
    python -m lcx.memory --config configs/lm_1b_tpu.py --slice v5e-256   # per-device memory
    python -m lcx.main --config configs/lm_1b_tpu.py:smoke --workdir /tmp/smoke   # CPU

Arguments (comma-separated): `smoke` (CPU-sized, seconds), `dd` (Dataset Decomposition
instead of first-fit packing, rows of 2K-32K at equal tokens; no ring), `lact` (LaCT
hybrid: LaCT and attention layers alternating; no ring). The default splits each row
over 4 devices (`mesh.sequence=4`, ring attention, balanced layout) and the parameters
and optimizer state over the rest (`fsdp`); LAMB with the Power scheduler; blocks
rematerialised keeping the matmul outputs and run under `lax.scan`.

22 layers of d_model 2,048, 16 query / 8 kv heads of 128, SwiGLU 5,632: 1.04B parameters
(the byte vocabulary's embeddings are negligible; a Hugging Face tokenizer changes that).
64 rows of 32,768 tokens per step: 2.1M tokens.
"""

import os

from lcx.config_loading import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py")
ARGS = ("smoke", "dd", "lact")


def get_config(arg=None):
    """`arg`: comma-separated subset of ARGS, or None."""
    args = set(filter(None, (arg or "").split(",")))
    if args - set(ARGS):
        raise ValueError(f"configs/lm_1b_tpu.py takes a subset of {ARGS}; got {arg!r}")
    smoke = "smoke" in args
    c = load_config(BASE, "smoke" if smoke else None)
    if not smoke:
        c.model.update(
            d_model=2048, num_layers=22, num_heads=16, num_kv_heads=8, head_dim=128,
            mlp_dim=5632, rope_theta=500_000.0,
        )  # fmt: skip
        c.train.update(steps=20_000, batch_size=64, seq_len=32_768, eval_every=1000,
                       eval_batches=8, checkpoint_every=500, log_every=10)  # fmt: skip
        c.schedule.update(warmup_steps=500)
    c.model.update(dtype="bfloat16", remat="dots", scan_layers=True)
    c.optimizer.name = "lamb"
    c.optimizer.lamb.update(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01)
    c.schedule.power.update(a=4.0, b=-0.51)
    c.schedule.update(name="power", peak_lr=0.01,
                      decay="exponential", decay_steps=max(1, c.train.steps // 10),
                      final_lr_fraction=0.0)  # fmt: skip
    c.mesh.update(data=1, fsdp=-1, tensor=1, sequence=1 if smoke else 4)
    if "dd" in args:
        c.data.packing = "dd"
        c.data.dd.update(min_log2=6 if smoke else 11, max_log2=6 if smoke else 15)
        c.mesh.sequence = 1
    if "lact" in args:
        c.model.block_pattern = ("lact", "attention")
        c.model.lact.update(chunk_size=16 if smoke else 2048, window=16 if smoke else 2048)
        c.mesh.sequence = 1
    return c
