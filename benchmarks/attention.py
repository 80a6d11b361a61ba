"""Packed attention: blocks visited per row and CPU time of xla_chunked (GPU: gpu_check.py).

    python benchmarks/attention.py blocks                  # any machine: the BENCHMARKS.md table
    python benchmarks/attention.py cpu                     # CPU: xla_chunked vs the reference
    python benchmarks/attention.py blocks --smoke          # seconds (also cpu --smoke)

`blocks`: the embedded corpus's documents are split and packed by lcx's own grain
pipeline (first-fit, 128 bins) into rows of 8K, 32K and 128K tokens. Per row and block
size it counts the (q block, kv block) pairs a dense causal kernel visits, the pairs
`block_schedule` visits, and the ideal sum_i L_i^2 / (2 bq bk) of the documents in the
row; the table reports the totals over the rows and the ratios, and the TPU kernel's
grid steps per computed block: a grid over every block pair (the kernel before the
compacted work list) and the compacted list (one step per scheduled pair, one per empty
q block).

`cpu`: forward+backward of `xla_chunked` against the `xla` reference in one run, on a
4K row holding one document (dense causal), 8K and 32K rows of exponential documents
(mean 256) and a 32K row of corpus documents; median (min-max) of repeats, and XLA's
temp buffer bytes of each compiled program (the reference is only compiled where its
scores would not fit in memory).

GPU timing (the kernels against cuDNN, on a lent GPU) is `benchmarks/gpu_check.py`.
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

from lcx.attention import block_schedule, count_visited, packed_attention  # noqa: E402
from lcx.attention.layout import dense_causal_blocks  # noqa: E402
from lcx.attention.step_list import grid_steps  # noqa: E402
from lcx.attention.testing import exponential_rows  # noqa: E402
from lcx.data import ByteTokenizer, load_or_tokenize, select_documents  # noqa: E402
from lcx.packing import PipelineOptions, packed_dataset  # noqa: E402


def packed_rows(row_len: int, num_rows: int, *, max_documents: int = 0, seed: int = 0):
    """Segment ids [num_rows, row_len] of the embedded corpus packed by the lcx pipeline."""
    docs = select_documents([], "train", eval_fraction=0.02, max_documents=max_documents)
    tokenizer = ByteTokenizer()
    corpus = load_or_tokenize(docs, tokenizer, None)
    opts = PipelineOptions(
        seq_len=row_len, batch_size=num_rows, pad_id=tokenizer.pad_id, packing="first_fit",
        settings={"num_bins": 128}, seed=seed, shuffle=True,
    )  # fmt: skip
    return next(iter(packed_dataset(corpus, opts)))["segment_ids"]


def ideal_blocks(segment_ids_row, block_q: int, block_kv: int) -> float:
    """sum_i L_i^2 / (2 bq bk) over the documents of one row."""
    ids, counts = np.unique(segment_ids_row[segment_ids_row != 0], return_counts=True)
    del ids
    return float(np.sum(counts.astype(np.float64) ** 2) / (2 * block_q * block_kv))


def block_counts(segment_ids, block: int) -> dict:
    """Dense, scheduled and ideal block counts, and TPU grid steps, summed over rows."""
    t = segment_ids.shape[1]
    sched = block_schedule(segment_ids, block_q=block, block_kv=block)
    ours = int(np.sum(count_visited(sched.kv_lo, sched.kv_hi)))
    dense = dense_causal_blocks(t, block, block) * len(segment_ids)
    ideal = sum(ideal_blocks(row, block, block) for row in segment_ids)
    grid = (t // block) ** 2 * len(segment_ids)  # a grid over every (q block, kv block)
    compacted = int(np.sum(grid_steps(sched.kv_lo, sched.kv_hi)))  # the TPU kernel's list
    return {"dense": dense, "ours": ours, "ideal": ideal, "grid": grid, "compacted": compacted}


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
        "| scheduled / ideal | TPU grid steps / scheduled: every pair (before) "
        "| compacted list (now) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['row_len']} | {r['block']} | {r['rows']} | {r['docs_per_row']:.1f} | "
            f"{r['dense']} | {r['ours']} | {r['ideal']:.0f} | {r['dense'] / r['ours']:.2f}x | "
            f"{r['ours'] / max(r['ideal'], 1e-9):.2f}x | {r['grid'] / r['ours']:.1f}x | "
            f"{r['compacted'] / r['ours']:.3f}x |"
        )
    return "\n".join(lines)


CPU_CASES = (
    ("4K, one document", 4096, "one"),
    ("8K, exponential mean 256", 8192, "exponential"),
    ("32K, exponential mean 256", 32768, "exponential"),
    ("32K, corpus documents", 32768, "corpus"),
)
SMOKE_CPU_CASES = (("512, one document", 512, "one"), ("1K, exponential", 1024, "exponential"))


def cpu_row(kind: str, row_len: int, seed: int = 0) -> np.ndarray:
    """Segment ids [1, row_len]: one document, exponential documents (mean 256), or corpus."""
    if kind == "one":
        return np.ones((1, row_len), np.int32)
    if kind == "exponential":
        return exponential_rows(row_len, 1, mean=256, seed=seed)
    return np.asarray(packed_rows(row_len, 1, seed=seed))


def _gradient_program(implementation, seg, q, block_sizes=None):
    """Jitted, compiled forward+backward of packed attention, and its temp buffer bytes."""

    def loss(q, k, v):
        out = packed_attention(q, k, v, seg, implementation=implementation, block_sizes=block_sizes)
        return out.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def time_cpu(cases=CPU_CASES, *, heads=4, head_dim=64, repeats=5, max_reference_gb=12.0,
             block_sizes=None):  # fmt: skip
    """Forward+backward ms (median, min, max) and temp bytes of xla_chunked and xla."""
    rng = np.random.default_rng(0)
    records = []
    for label, row_len, kind in cases:
        seg = jnp.asarray(cpu_row(kind, row_len))
        q = jnp.asarray(rng.standard_normal((1, row_len, heads, head_dim)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32) for _ in range(2))
        programs = {
            "xla_chunked": _gradient_program("xla_chunked", seg, q, block_sizes),
            "xla": _gradient_program("xla", seg, q),
        }
        runnable = {n: p for n, (p, b) in programs.items() if b < max_reference_gb * 2**30}
        times = {name: [] for name in runnable}
        for fn in runnable.values():
            jax.block_until_ready(fn(q, k, v))  # warm-up
        for _ in range(repeats):  # alternate, so background load hits both alike
            for name, fn in runnable.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[name].append(1e3 * (time.perf_counter() - t0))
        docs = len(np.unique(np.asarray(seg)[np.asarray(seg) != 0]))
        record = dict(label=label, row_len=row_len, documents=docs)
        for name, (_, temp) in programs.items():
            t = times.get(name)
            record[name] = dict(temp_bytes=temp, ms=None if not t else dict(
                median=statistics.median(t), min=min(t), max=max(t)))  # fmt: skip
        records.append(record)
    return records


def cpu_markdown(records) -> str:
    """The BENCHMARKS.md table of `time_cpu`."""

    def ms(r):
        m = r["ms"]
        return "not run" if m is None else f"{m['median']:,.0f} ({m['min']:,.0f}-{m['max']:,.0f})"

    lines = [
        "| row | documents | xla_chunked ms | xla (reference) ms | reference / chunked "
        "| temp memory, chunked | temp memory, reference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        chunked, ref = r["xla_chunked"], r["xla"]
        ratio = (
            "-" if ref["ms"] is None else f"{ref['ms']['median'] / chunked['ms']['median']:.2f}x"
        )
        lines.append(
            f"| {r['label']} | {r['documents']} | {ms(chunked)} | {ms(ref)} | {ratio} | "
            f"{chunked['temp_bytes'] / 2**20:,.0f} MiB | {ref['temp_bytes'] / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("blocks", "cpu"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="cpu: timed repeats")
    parser.add_argument(
        "--exponential_mean",
        type=int,
        default=0,
        help="synthetic rows with exponential document lengths of this mean",
    )
    args = parser.parse_args(argv)
    print(f"command: python benchmarks/attention.py {' '.join(argv or sys.argv[1:])}")
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}")
    if args.mode == "blocks":
        row_lens = (1024, 2048) if args.smoke else (8192, 32768, 131072)
        blocks = (128, 256) if args.smoke else (128, 256, 512)
        records = blocks_table(
            row_lens, blocks, args.rows, max_documents=100 if args.smoke else 0,
            exponential_mean=args.exponential_mean,
        )  # fmt: skip
        print(blocks_markdown(records))
        return records
    records = time_cpu(
        SMOKE_CPU_CASES if args.smoke else CPU_CASES, repeats=1 if args.smoke else args.repeats
    )
    print(cpu_markdown(records))
    return records


if __name__ == "__main__":
    main()
