"""Per-shard attention work of ring attention under each sequence layout (counted, not timed).

    python benchmarks/ring_balance.py            # the BENCHMARKS.md table
    python benchmarks/ring_balance.py --smoke    # seconds

Rows of `--length` tokens split over `--shards` devices: in ring step i device d attends
its query shard against key shard (d - i) mod n, and every device waits for the slowest,
so a step costs the most blocks any device visits in it (`block_schedule` of that
shard pair, `count_visited`; a pair with no visible key is a skipped step). Reported
per layout: the ring's critical path (the sum over steps of the per-step maximum), the
ideal (all blocks / n), their ratio (balance, 1 is perfect), and the skipped steps.

Row kinds: `corpus` (random rows of the embedded corpus's documents, cut to the row,
packed first-fit-decreasing), `short` (exponential lengths, mean `--mean_document`), `long`
(one document filling the row).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcx.attention import block_schedule, count_visited  # noqa: E402
from lcx.attention.ring import LAYOUTS, balanced_permutation, layout_permutation  # noqa: E402
from lcx.config_loading import load_config  # noqa: E402
from lcx.packing import first_fit_decreasing  # noqa: E402
from lcx.settings import resolve  # noqa: E402
from lcx.train.input import load_split  # noqa: E402


def rows_of(lengths, length, count, rng):
    """Segment ids and positions of `count` random rows of `first_fit_decreasing` packing."""
    lengths = [min(int(n), length) for n in lengths if n > 0]
    bins = first_fit_decreasing(lengths, length)
    bins = [bins[i] for i in rng.permutation(len(bins))]
    seg = np.zeros((count, length), np.int32)
    pos = np.zeros_like(seg)
    for r, members in enumerate(bins[:count]):
        at = 0
        for j, i in enumerate(members):
            seg[r, at : at + lengths[i]] = j + 1
            pos[r, at : at + lengths[i]] = np.arange(lengths[i])
            at += lengths[i]
    return seg, pos


def row_kinds(args, rng):
    """{kind: (segment ids, positions)} of the rows measured."""
    config = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), None)
    corpus, _ = load_split(resolve(config).data, "train", None)
    lengths = [len(corpus.document(i)) for i in range(corpus.num_documents)]
    lengths = list(rng.permutation(lengths))
    exponential = 1 + rng.exponential(args.mean_document, args.rows * args.length // 100)
    long_seg = np.ones((1, args.length), np.int32)
    return {
        "corpus": rows_of(lengths, args.length, args.rows, rng),
        "short": rows_of(exponential.astype(int), args.length, args.rows, rng),
        "long": (long_seg, np.arange(args.length, dtype=np.int32)[None]),
    }


@functools.partial(jax.jit, static_argnames=("shards", "block"))
def step_work(seg, pos, shards, block):
    """int [n, n]: blocks device d visits against key shard j, for one laid-out row."""
    seg, pos = seg.reshape(shards, -1), pos.reshape(shards, -1)

    def pair(d, j):
        """Blocks of query shard d against key shard j."""
        s = block_schedule(
            seg[d][None], block_q=block, block_kv=block, kv_segment_ids=seg[j][None],
            q_positions=pos[d][None], kv_positions=pos[j][None],
        )  # fmt: skip
        return count_visited(s.kv_lo, s.kv_hi)[0]

    index = jnp.arange(shards)
    return jax.vmap(lambda d: jax.vmap(lambda j: pair(d, j))(index))(index)


def measure(seg_rows, pos_rows, shards, block, layout):
    """Critical-path blocks, all blocks and skipped (device, step) pairs, summed over rows."""
    critical = total = skipped = 0
    for seg, pos in zip(seg_rows, pos_rows, strict=True):
        if layout == "balanced":
            perm = balanced_permutation(seg, shards, block)
        else:
            perm = layout_permutation(len(seg), shards, layout)
        work = np.asarray(step_work(seg[perm], pos[perm], shards, block))
        for i in range(shards):
            per_device = [work[d, (d - i) % shards] for d in range(shards)]
            critical += max(per_device)
            skipped += sum(w == 0 for w in per_device)
        total += work.sum()
    return {"critical": int(critical), "total": int(total), "skipped": int(skipped),
            "balance": total / shards / max(critical, 1)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--mean_document", type=float, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.length, args.shards, args.block, args.rows, args.mean_document = 512, 4, 32, 1, 40
    rng = np.random.default_rng(args.seed)
    results = {}
    for kind, (seg, pos) in row_kinds(args, rng).items():
        for layout in LAYOUTS:
            results[kind, layout] = measure(seg, pos, args.shards, args.block, layout)
    print("\n`" + " ".join(["python benchmarks/ring_balance.py", *(argv or sys.argv[1:])]) + "`")
    print(f"\n{args.shards} shards, rows of {args.length:,} tokens, blocks of {args.block}\n")
    print("| rows | layout | critical-path blocks | all blocks / n | balance | skipped steps |")
    print("|---|---|---|---|---|---|")
    for (kind, layout), r in results.items():
        print(
            f"| {kind} | {layout} | {r['critical']:,} | {r['total'] / args.shards:,.0f} | "
            f"{r['balance']:.2f} | {r['skipped']} |"
        )
    return results


if __name__ == "__main__":
    main()
