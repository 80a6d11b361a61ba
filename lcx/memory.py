"""Per-device training memory of a config on a named TPU slice, before renting it.

    python -m lcx.memory --config configs/lm_1b_tpu.py --slice v5e-256

Parameters, optimizer state and gradients (float32, sharded over `fsdp` x `tensor`),
and the activations the backward pass keeps under `model.remat`, for the local tokens
(rows over `data` x `fsdp`, each row's tokens over `sequence`), plus the float32
logits. An estimate by counting, not a bound: at smoke size XLA's compiled CPU step needs
0.9-2.4x the count (tests/test_memory.py, BENCHMARKS.md: JAX 0.10 keeps float32 copies of
bfloat16 values and attention tiles the count leaves out; JAX 0.11+ reuses buffers the
count assumes live at once). On a slice, the compiled step's own analysis is the final
word.
"""

from __future__ import annotations

import argparse
import math
import sys

from lcx.errors import UserError

# Chips and HBM GiB per chip of the slices lcx plans for (v5p counts TensorCores: 2 per chip).
SLICES = {
    "v5e-8": (8, 16), "v5e-64": (64, 16), "v5e-256": (256, 16),
    "v5p-8": (4, 95), "v5p-128": (64, 95), "v5p-1024": (512, 95),
}  # fmt: skip
# Optimizer state per parameter, in float32 copies.
OPTIMIZER_COPIES = {"adamw": 2, "lamb": 2, "adagrad": 1, "adagrad_norm": 0}


def activation_elements_per_token(cfg) -> int:
    """Elements one layer keeps per token for the backward pass, by `model.remat`."""
    d, f = cfg.d_model, cfg.mlp_dim
    q, kv = cfg.num_heads * cfg.head_dim, 2 * cfg.num_kv_heads * cfg.head_dim
    if cfg.remat in ("full", "offload"):  # the block's input (offload: matmuls on the host)
        return d
    if cfg.remat == "dots":  # matmul outputs, and attention's output for its backward
        return q + kv + q + d + 2 * f + d
    return 4 * d + 2 * q + kv + 3 * f  # everything: norms, projections, SwiGLU


def _no_remat(cfg):
    """`cfg` with rematerialisation off."""
    import dataclasses

    return dataclasses.replace(cfg, remat="none")


def estimate(config, devices: int) -> dict:
    """Bytes per device: params, optimizer, gradients, update temporaries, activations
    (kept, plus one layer's working set), logits, total. With model.lora the optimizer
    state, gradients and update cover the float32 adapters only."""
    from lcx.lora import split
    from lcx.runtime.params import abstract_model
    from lcx.runtime.sharding import MESH_AXES
    from lcx.settings import resolve
    from lcx.train.model_source import model_config

    config = resolve(config)
    cfg = model_config(config)  # the imported architecture with init.hf_checkpoint
    _, abstract = abstract_model(cfg)
    import jax

    params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    adapters = jax.tree.leaves(split(abstract.to_pure_dict())[0]) if cfg.lora else ()
    sizes = dict(zip(MESH_AXES, config.mesh.resolve(devices), strict=True))
    shards = sizes["fsdp"] * sizes["tensor"]
    rows = config.train.batch_size / (sizes["data"] * sizes["fsdp"])
    tokens = rows * config.train.seq_len / sizes["sequence"]
    width = 2 if cfg.dtype == "bfloat16" else 4
    per_token = activation_elements_per_token(cfg) * cfg.num_layers * width
    if config.optimizer.name not in OPTIMIZER_COPIES:
        raise UserError(
            f"optimizer.name={config.optimizer.name!r}; valid: {list(OPTIMIZER_COPIES)}"
        )
    copies = OPTIMIZER_COPIES[config.optimizer.name]
    # The backward pass works on one layer at a time with everything of it live (the
    # layer recomputed under remat), and the update holds two parameter-sized temporaries.
    working = tokens * activation_elements_per_token(_no_remat(cfg)) * width
    stored = 2 if cfg.param_dtype == "bfloat16" else 4  # optimizer state follows the params
    trained = sum(math.prod(x.shape) for x in adapters) if adapters else params
    trained_bytes = 4 * trained if adapters else stored * trained  # adapters: float32
    out = {
        "parameters": stored * params / shards,
        "optimizer": copies * trained_bytes / shards,
        "gradients": trained_bytes / shards,
        "update": 2 * trained_bytes / shards,
        "activations": tokens * per_token + working,
        "logits": tokens * 4 * 3 * cfg.vocab_size / sizes["tensor"],  # logits, softmax, grad
    }
    out["total"] = sum(out.values())
    out["parameter_count"] = params
    out["trained_parameter_count"] = trained
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
    parser.add_argument("--slice", required=True, help=f"one of {sorted(SLICES)}")
    args = parser.parse_args(argv)
    if args.slice not in SLICES:
        print(f"lcx: error: --slice={args.slice!r}; valid: {sorted(SLICES)}", file=sys.stderr)
        return 2
    from lcx.config_loading import load_config

    path, _, arg = args.config.partition(":")
    chips, hbm = SLICES[args.slice]
    try:
        config = load_config(path, arg or None)
        memory = estimate(config, chips)
    except ValueError as e:
        print(f"lcx: error: {e}", file=sys.stderr)
        return 2
    gib = 2**30
    billions = memory["parameter_count"] / 1e9
    print(
        f"{args.config} on {args.slice} ({chips} chips of {hbm} GiB), {billions:.2f}B "
        f"parameters, remat={config.model.remat}:"
    )
    for key in ("parameters", "optimizer", "gradients", "update", "activations", "logits", "total"):
        print(f"  {key:12s} {memory[key] / gib:8.2f} GiB per device")
    fits = "fits" if memory["total"] < 0.9 * hbm * gib else "does NOT fit"
    print(f"  {fits} in {hbm} GiB (90% usable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
