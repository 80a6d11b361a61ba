"""Dataset Decomposition vs concat-and-chunk at equal tokens, target context 8K.

    python benchmarks/dd.py                 # the BENCHMARKS.md run (CPU, several minutes)
    python benchmarks/dd.py --smoke         # seconds

The same tiny model trains on the embedded corpus through `lcx.train.train_and_evaluate`
with `data.packing` = `concat_chunk` (rows of 8,192 tokens cut from the concatenated
corpus, documents masked from each other) or `dd` (Dataset Decomposition, buckets 2^6 to
2^13, Grow-P2 curriculum; 8,192 tokens per step either way), for the same number of
tokens, then evaluates on the same packed eval rows. Reported per strategy: attention
work per token relative to dense 8K rows (from the rows the pipeline emits), wall time
per token of training, final eval loss, and the input pipeline's own throughput against
the training step's (the pipeline must be at least 10x faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lcx.config_loading import load_config  # noqa: E402
from lcx.data import ByteTokenizer  # noqa: E402
from lcx.packing import PipelineOptions  # noqa: E402
from lcx.packing.stats import measure  # noqa: E402
from lcx.settings import resolve  # noqa: E402
from lcx.train import train_and_evaluate  # noqa: E402
from lcx.train.input import load_split  # noqa: E402

STRATEGIES = ("concat_chunk", "dd")


def strategy_config(packing: str, *, smoke: bool, steps: int, max_log2: int):
    """The tiny model at row length 2^max_log2, one row's worth of tokens per step."""
    c = load_config(os.path.join(ROOT, "configs", "lm_tiny_dd.py"), "smoke" if smoke else None)
    c.data.packing = packing
    c.data.dd.update(max_log2=max_log2, min_log2=min(6, max_log2 - 2), cycles=1)
    c.train.update(seq_len=1 << max_log2, batch_size=1, steps=steps, progress=False)
    c.train.update(eval_every=steps, eval_batches=4, checkpoint_every=steps, log_every=1)
    c.schedule.warmup_steps = max(1, steps // 10)
    if not smoke:
        c.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
        c.model.mlp_dim = 384
    return c


def run(*, smoke=False, steps=60, max_log2=13) -> dict:
    """Train, evaluate and measure both strategies; per-strategy results."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in STRATEGIES:
            config = resolve(strategy_config(packing, smoke=smoke, steps=steps, max_log2=max_log2))
            workdir = os.path.join(tmp, packing)
            t0 = time.perf_counter()
            last = train_and_evaluate(config, workdir)
            train_seconds = time.perf_counter() - t0
            tokens = last["tokens_seen"]
            corpus, _ = load_split(config.data, "train", workdir)
            opts = PipelineOptions(
                seq_len=config.train.seq_len, batch_size=config.train.batch_size,
                packing=packing, settings=config.data.packing_settings(), seed=config.seed,
                pad_id=ByteTokenizer().pad_id,
            )  # fmt: skip
            stats = measure(corpus, opts, max_tokens=int(tokens))
            results[packing] = {
                "tokens": tokens,
                "eval_loss": last["eval_loss"],
                "seconds_per_mtoken": train_seconds / tokens * 1e6,
                "attention_work": stats.attention_work_per_token,
                "pipeline_tokens_per_sec": stats.tokens_per_sec,
                "train_tokens_per_sec": tokens / train_seconds,
                "compiles": last.get("compiles", 1),
            }
    for r in results.values():
        r["pipeline_vs_train"] = r["pipeline_tokens_per_sec"] / r["train_tokens_per_sec"]
    return {"settings": dict(steps=steps, row_len=1 << max_log2), "results": results}


def markdown_table(result: dict) -> str:
    """The BENCHMARKS.md table."""
    lines = [
        "| packing | tokens | attention work / dense | s / M tokens (train) | final eval loss "
        "| compiled shapes | pipeline tokens/s | pipeline / train |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {r['tokens']:,.0f} | {r['attention_work']:.3f} | "
            f"{r['seconds_per_mtoken']:.0f} | {r['eval_loss']:.3f} | {r['compiles']:.0f} | "
            f"{r['pipeline_tokens_per_sec']:,.0f} | {r['pipeline_vs_train']:,.0f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max_log2", type=int, default=13)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.max_log2 = 3, 6
    result = run(smoke=args.smoke, steps=args.steps, max_log2=args.max_log2)
    command = "python benchmarks/dd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}`\n")
    print(", ".join(f"{k}={v}" for k, v in result["settings"].items()) + "\n")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
