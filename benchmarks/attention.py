"""Packed attention: blocks visited per row, and (on a GPU) kernel time against cuDNN.

    python benchmarks/attention.py blocks                  # any machine: the BENCHMARKS.md table
    python benchmarks/attention.py time                    # on a GPU: Pallas vs cuDNN vs XLA
    python benchmarks/attention.py blocks --smoke          # seconds

`blocks`: the embedded corpus's documents are split and packed by lcx's own grain
pipeline (first-fit, 128 bins) into rows of 8K, 32K and 128K tokens. Per row and block
size it counts the (q block, kv block) pairs a dense causal kernel visits, the pairs
`block_schedule` visits, and the ideal sum_i L_i^2 / (2 bq bk) of the documents in the
row; the table reports the totals over the rows and the ratios.

`time`: forward and forward+backward time of `packed_attention` (the Pallas kernel of
the backend) against `jax.nn.dot_product_attention(implementation="cudnn")` on the same
rows (dense causal: it cannot skip documents), with useful TFLOP/s counting only
visible score entries (4 * D * H * entries forward; 2.5x that for the backward). On a
CPU it runs the kernels in interpret mode at tiny size, only to keep the script alive.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lcx.attention import BlockSizes, block_schedule, count_visited, packed_attention  # noqa: E402
from lcx.attention.layout import dense_causal_blocks  # noqa: E402
from lcx.data import ByteTokenizer, load_or_tokenize, select_documents  # noqa: E402
from lcx.packing import PipelineOptions, packed_dataset  # noqa: E402


def packed_rows(row_len: int, num_rows: int, *, max_documents: int = 0, seed: int = 0):
    """Segment ids [num_rows, row_len] of the embedded corpus packed by the lcx pipeline."""
    docs = select_documents([], "train", eval_fraction=0.02, max_documents=max_documents)
    corpus = load_or_tokenize(docs, ByteTokenizer(), None)
    opts = PipelineOptions(
        seq_len=row_len, batch_size=num_rows, num_packing_bins=128, seed=seed, shuffle=True
    )
    return next(iter(packed_dataset(corpus, opts)))["segment_ids"]


def exponential_rows(row_len: int, num_rows: int, mean: int, seed: int = 0) -> np.ndarray:
    """Rows packed back to back with exponential document lengths (PAPERS.md's example)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((num_rows, row_len), np.int32)
    for row in seg:
        pos, doc = 0, 1
        while pos < row_len:
            n = max(1, int(rng.exponential(mean)))
            row[pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    return seg


def ideal_blocks(segment_ids_row, block_q: int, block_kv: int) -> float:
    """sum_i L_i^2 / (2 bq bk) over the documents of one row."""
    ids, counts = np.unique(segment_ids_row[segment_ids_row != 0], return_counts=True)
    del ids
    return float(np.sum(counts.astype(np.float64) ** 2) / (2 * block_q * block_kv))


def block_counts(segment_ids, block: int) -> dict:
    """Dense, scheduled and ideal block counts summed over rows."""
    t = segment_ids.shape[1]
    sched = block_schedule(segment_ids, block_q=block, block_kv=block)
    ours = int(np.sum(count_visited(sched.kv_lo, sched.kv_hi)))
    dense = dense_causal_blocks(t, block, block) * len(segment_ids)
    ideal = sum(ideal_blocks(row, block, block) for row in segment_ids)
    grid = (t // block) ** 2 * len(segment_ids)  # the TPU kernel's (q block, kv block) steps
    return {"dense": dense, "ours": ours, "ideal": ideal, "grid": grid}


def blocks_table(row_lens, blocks, num_rows, max_documents=0, exponential_mean=0) -> list[dict]:
    """One record per (row length, block size); corpus rows, or synthetic exponential ones."""
    records = []
    for row_len in row_lens:
        if exponential_mean:
            seg = exponential_rows(row_len, num_rows, exponential_mean)
        else:
            seg = np.asarray(packed_rows(row_len, num_rows, max_documents=max_documents))
        docs_per_row = np.mean([len(np.unique(r[r != 0])) for r in seg])
        for block in blocks:
            counts = block_counts(seg, block)
            records.append(
                dict(
                    row_len=row_len, block=block, rows=len(seg), docs_per_row=docs_per_row, **counts
                )  # fmt: skip
            )
    return records


def blocks_markdown(records) -> str:
    """The BENCHMARKS.md table."""
    lines = [
        "| row | block | rows | docs/row | dense blocks | scheduled | ideal | dense / scheduled "
        "| scheduled / ideal | TPU grid steps / scheduled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['row_len']} | {r['block']} | {r['rows']} | {r['docs_per_row']:.1f} | "
            f"{r['dense']} | {r['ours']} | {r['ideal']:.0f} | {r['dense'] / r['ours']:.2f}x | "
            f"{r['ours'] / max(r['ideal'], 1e-9):.2f}x | {r['grid'] / r['ours']:.1f}x |"
        )
    return "\n".join(lines)


def _median_ms(fn, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` in milliseconds, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_kernels(row_len, *, heads=16, head_dim=128, rows=1, repeats=10, interpret=False):
    """Forward and forward+backward ms of the backend's kernel, cuDNN (GPU) and XLA dense."""
    rng = np.random.default_rng(0)
    seg = jnp.asarray(packed_rows(row_len, rows, max_documents=200 if interpret else 0))
    dtype = jnp.float32 if interpret else jnp.bfloat16
    q, k, v = (jnp.asarray(rng.standard_normal((rows, row_len, heads, head_dim)), dtype)
               for _ in range(3))  # fmt: skip
    on_gpu = jax.default_backend() == "gpu"
    kernel = "pallas_gpu" if on_gpu else "pallas_tpu"
    small = BlockSizes(block_q=32, block_kv=32) if interpret else None
    impls = {
        "lcx " + kernel: lambda q, k, v: packed_attention(
            q, k, v, seg, implementation=kernel, block_sizes=small, interpret=interpret
        ),
        "dense causal (xla)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"
        ),
    }
    if on_gpu:
        impls["dense causal (cudnn)"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    visible = sum(float(np.sum(np.unique(r[r != 0], return_counts=True)[1] ** 2 / 2))
                  for r in np.asarray(seg))  # fmt: skip
    flops = 4 * head_dim * heads * visible
    results = {}
    for name, fn in impls.items():
        fwd = jax.jit(fn)
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2)))  # fmt: skip
        f_ms = _median_ms(fwd, q, k, v, repeats=repeats)
        b_ms = _median_ms(grad, q, k, v, repeats=repeats)
        results[name] = {"fwd_ms": f_ms, "fwd_bwd_ms": b_ms,
                         "useful_tflops_fwd": flops / (f_ms * 1e-3) / 1e12}  # fmt: skip
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("blocks", "time"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument(
        "--exponential_mean",
        type=int,
        default=0,
        help="synthetic rows with exponential document lengths of this mean",
    )
    args = parser.parse_args(argv)
    print(f"command: python benchmarks/attention.py {' '.join(argv or sys.argv[1:])}")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.mode == "blocks":
        row_lens = (1024, 2048) if args.smoke else (8192, 32768, 131072)
        blocks = (128, 256) if args.smoke else (128, 256, 512)
        records = blocks_table(
            row_lens, blocks, args.rows, max_documents=100 if args.smoke else 0,
            exponential_mean=args.exponential_mean,
        )  # fmt: skip
        print(blocks_markdown(records))
        return records
    interpret = jax.default_backend() != "gpu"
    lens = (128,) if interpret else (4096, 16384, 32768, 65536)
    out = {}
    for row_len in lens:
        size = dict(heads=2, head_dim=16, repeats=1) if interpret else {}
        out[row_len] = time_kernels(row_len, interpret=interpret, **size)
        for name, r in out[row_len].items():
            print(
                f"T={row_len} {name}: fwd {r['fwd_ms']:.2f} ms, "
                f"fwd+bwd {r['fwd_bwd_ms']:.2f} ms, useful {r['useful_tflops_fwd']:.1f} TFLOP/s"
            )
    return out


if __name__ == "__main__":
    main()
