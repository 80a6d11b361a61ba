"""Optimizers at equal tokens: AdamW + cosine, LAMB + power, AdamW + AdAdaGrad.

    python benchmarks/optimizers.py                      # the BENCHMARKS.md run
    python benchmarks/optimizers.py --smoke              # seconds, smoke-sized model

Each variant trains the tiny model of configs/lm_tiny.py (lm_tiny_lamb.py,
lm_tiny_adaptive.py) on the embedded corpus until the same token budget, through
`lcx.train.train_and_evaluate`, then evaluates on the same eval batches. Reported per
variant: final eval loss, wall time per million tokens, the optimizer update's time
relative to AdamW's (the jitted `tx.update` alone on the model's real parameter tree,
median of repeats), and for the adaptive run its batch-size trajectory (a PNG).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lcx.config_loading import load_config  # noqa: E402
from lcx.train import train_and_evaluate  # noqa: E402
from lcx.train.loop import Experiment  # noqa: E402
from lcx.train.metrics import read_metrics  # noqa: E402

VARIANTS = {
    "adamw+cosine": "lm_tiny",
    "lamb+power": "lm_tiny_lamb",
    "adamw+adadagrad": "lm_tiny_adaptive",
}


def variant_config(name: str, *, tokens: int, smoke: bool):
    """The variant's config, stopping at `tokens`; its schedule spans exactly `tokens`."""
    path = os.path.join(ROOT, "configs", f"{VARIANTS[name]}.py")
    config = load_config(path, "smoke" if smoke else None)
    tc = config.train
    steps = max(2, tokens // (tc.batch_size * tc.seq_len))
    tc.update(steps=steps, max_tokens=tokens, progress=False, log_every=1)
    tc.update(eval_every=steps, checkpoint_every=steps)
    if config.schedule.decay_steps:
        config.schedule.decay_steps = max(1, steps // 10)
    return config


def update_time_ms(config, workdir: str, repeats: int) -> float:
    """Median wall time of one jitted optimizer update on the model's parameters."""
    exp = Experiment(config, workdir)
    state = exp.init_state()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    update = jax.jit(lambda g, s, p: exp.tx.update(g, s, p, tokens_seen=1e6, batch_size=16))
    jax.block_until_ready(update(grads, state.opt_state, state.params))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(update(grads, state.opt_state, state.params))
        times.append(time.perf_counter() - t0)
    exp.checkpointer.close()
    return 1e3 * statistics.median(times)


def run(*, tokens: int, smoke: bool = False, repeats: int = 20, plot: str | None = None):
    """Train every variant to `tokens`; returns per-variant results."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            config = variant_config(name, tokens=tokens, smoke=smoke)
            workdir = os.path.join(tmp, name.replace("+", "_"))
            t0 = time.perf_counter()
            last = train_and_evaluate(config, workdir)
            wall = time.perf_counter() - t0
            records = [r for r in read_metrics(workdir) if "loss" in r]
            results[name] = {
                "eval_loss": last["eval_loss"],
                "tokens": records[-1]["tokens_seen"],
                "steps": records[-1]["step"],
                "seconds_per_mtoken": wall / records[-1]["tokens_seen"] * 1e6,
                "update_ms": update_time_ms(config, os.path.join(tmp, "u_" + name), repeats),
                "trajectory": [(r["tokens_seen"], r["batch_size"]) for r in records],
            }
    base = results["adamw+cosine"]["update_ms"]
    for r in results.values():
        r["update_vs_adamw"] = r["update_ms"] / base
    if plot:
        plot_batch_sizes(results, plot)
    return results


def plot_batch_sizes(results: dict, path: str):
    """Batch size against tokens seen for every variant, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results.items():
        tokens, sizes = zip(*r["trajectory"], strict=True)
        ax.step(np.asarray(tokens) / 1e6, sizes, where="post", label=name)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("batch size (sequences)")
    ax.set_title("Batch size under AdAdaGrad vs fixed batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    """The BENCHMARKS.md table."""
    lines = [
        "| variant | tokens | steps | final eval loss | s / M tokens | update time vs AdamW |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tokens']:.0f} | {r['steps']} | {r['eval_loss']:.3f} | "
            f"{r['seconds_per_mtoken']:.1f} | {r['update_vs_adamw']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200 * 16 * 256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--plot", default="benchmarks/adaptive_batch_size.png")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens = min(args.tokens, 6 * 4 * 64)
    results = run(tokens=args.tokens, smoke=args.smoke, repeats=args.repeats, plot=args.plot)
    print(f"command: python benchmarks/optimizers.py {' '.join(argv or sys.argv[1:])}")
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
