"""LaCT chunks on the row's grid vs on each document's grid: training tokens/s.

    python benchmarks/lact_grid.py            # the BENCHMARKS.md run
    python benchmarks/lact_grid.py --smoke    # seconds

The model of configs/lm_lact_tiny.py (every layer LaCT + sliding-window attention, chunks
and window of 256, rows of 1,024 tokens, 4 rows a step) takes jitted forward+backward
steps (summed next-token loss, gradients of every parameter) on packed rows of
documents with exponential lengths (mean `--mean_document` tokens), with
`model.lact.grid` = "row" and = "document", alternating, median of `--repeats` after a
compile run. The document grid makes a document packed at any offset equal to itself
alone (what the serving engine computes); this measures what it costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcx.config_loading import load_config  # noqa: E402
from lcx.model import Transformer, TransformerConfig  # noqa: E402
from lcx.train.step import lm_loss  # noqa: E402

GRIDS = ("row", "document")


def packed_batch(rng, rows, length, mean_document, vocab):
    """Tokens, segment ids and positions of rows filled with exponential-length documents."""
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros_like(seg)
    for r in range(rows):
        start, doc = 0, 1
        while start < length:
            n = min(length - start, 1 + int(rng.exponential(mean_document)))
            seg[r, start : start + n], pos[r, start : start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def step_fn(model_fields, grid):
    """A jitted (params, batch) -> gradients of the summed loss, for one grid."""
    lact = dict(model_fields["lact"], grid=grid)
    model = Transformer(TransformerConfig(**{**model_fields, "lact": lact}), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, batch):
        logits = nnx.merge(graphdef, params)(
            batch["tokens"], batch["segment_ids"], batch["positions"]
        )
        return lm_loss(logits, batch)[0]

    return params, jax.jit(jax.grad(loss))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mean_document", type=float, default=300)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(
        os.path.join(ROOT, "configs", "lm_lact_tiny.py"), "smoke" if args.smoke else None
    )
    fields = config.model.to_dict()
    rows, length = config.train.batch_size, config.train.seq_len
    if args.smoke:
        rows, args.mean_document = 2, 20
    batch = packed_batch(
        np.random.default_rng(0), rows, length, args.mean_document, fields["vocab_size"]
    )
    real_tokens = int(np.sum(batch["segment_ids"] > 0))
    fns = {grid: step_fn(fields, grid) for grid in GRIDS}
    for params, fn in fns.values():
        jax.block_until_ready(fn(params, batch))  # compile
    times = {grid: [] for grid in GRIDS}
    for _ in range(args.repeats):
        for grid in GRIDS:  # alternating, so drift hits both
            params, fn = fns[grid]
            start = time.perf_counter()
            jax.block_until_ready(fn(params, batch))
            times[grid].append(time.perf_counter() - start)
    result = {"settings": dict(vars(args), rows=rows, length=length)}
    for grid in GRIDS:
        rates = [real_tokens / t for t in times[grid]]
        result[grid] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    result["document_over_row"] = result["document"]["median"] / result["row"]["median"]
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`python benchmarks/lact_grid.py {flags}`".replace(" `", "`") + "\n")
    print("| grid | training tokens/s (median, min-max) |")
    print("|---|---|")
    for grid in GRIDS:
        r = result[grid]
        print(f"| {grid} | {r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) |")
    print(f"document / row: {result['document_over_row']:.3f}")
    return result


if __name__ == "__main__":
    main()
