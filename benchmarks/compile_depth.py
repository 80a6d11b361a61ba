"""Compile time of the training gradient vs depth: blocks in a Python loop vs `lax.scan`.

    python benchmarks/compile_depth.py            # the BENCHMARKS.md figures
    python benchmarks/compile_depth.py --smoke    # seconds

lm_tiny's layer shape, the jitted value-and-gradient of the next-token loss on 4 rows
of 256 tokens, lowered and compiled from abstract parameters (nothing allocated), with
`model.scan_layers` off and on; one compile each (compile times vary little).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lcx.model import Transformer, TransformerConfig
from lcx.train.step import lm_loss


def compile_seconds(layers: int, scan: bool, d_model: int, length: int) -> float:
    """Seconds to lower and compile the loss gradient of a `layers`-deep model."""
    cfg = TransformerConfig(num_layers=layers, scan_layers=scan, d_model=d_model,
                            mlp_dim=3 * d_model)  # fmt: skip
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    batch = dict(tokens=jnp.zeros((4, length), jnp.int32),
                 segment_ids=jnp.ones((4, length), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(length), (4, length)))  # fmt: skip

    def loss(params):
        model = nnx.merge(graphdef, params)
        total, count = lm_loss(model(batch["tokens"], batch["segment_ids"],
                                     batch["positions"]), batch)  # fmt: skip
        return total / count

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--depths", default="4,16")
    args = parser.parse_args(argv)
    d_model, length = (32, 16) if args.smoke else (256, 256)
    depths = [2, 4] if args.smoke else [int(x) for x in args.depths.split(",")]
    results = {(n, scan): compile_seconds(n, scan, d_model, length)
               for n in depths for scan in (False, True)}  # fmt: skip
    print("\n`" + " ".join(["python benchmarks/compile_depth.py", *(argv or sys.argv[1:])]) + "`\n")
    print("| layers | loop s | scan s |")
    print("|---|---|---|")
    for n in depths:
        print(f"| {n} | {results[n, False]:.1f} | {results[n, True]:.1f} |")
    return results


if __name__ == "__main__":
    main()
