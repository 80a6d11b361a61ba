"""Training throughput: packed rows vs. the same documents padded one per row.

    python benchmarks/train_throughput.py                     # the BENCHMARKS.md run
    python benchmarks/train_throughput.py --smoke             # seconds, smoke-sized model
    python benchmarks/train_throughput.py --seq_len=4096 --batch_size=2

Both strategies train the tiny model of configs/lm_tiny.py on the same corpus with the
same config except `data.packing`: "first_fit" (several document pieces per row) and
"padded" (one piece per row, the baseline). Documents longer than a row are split into
row-sized pieces by the pipeline in both cases, so packing only gains on the pieces
shorter than a row. Each step runs through the library's own `StepRunner` (host batch,
`put_batch`, the jitted step), as `lcx.main` trains. After warm-up, repeats of `steps`
steps alternate between the strategies, so drifting background load hits both alike.

Throughput counts real target tokens (non-padding tokens with a next token in the same
document), from `lcx.packing.batch_stats`, per second of wall time including the host
input pipeline; the time the pipeline alone takes is reported beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `configs` imports from the repository root, as for lcx.main

import jax  # noqa: E402

from configs import lm_tiny  # noqa: E402
from lcx.train.loop import Experiment  # noqa: E402
from lcx.train.runner import StepRunner  # noqa: E402

PACKED, PADDED = "first_fit", "padded"
STRATEGIES = (PACKED, PADDED)
SAMPLES = ("tokens_per_sec", "padding_fraction", "step_ms", "pipeline_ms")


def benchmark_config(*, seq_len: int, batch_size: int, smoke: bool = False, paths=()):
    """configs/lm_tiny.py (or its smoke variant) with the benchmark's row shape."""
    config = lm_tiny.get_config("smoke" if smoke else None)
    config.train.update(seq_len=seq_len, batch_size=batch_size, micro_batch_size=0)
    config.train.update(progress=False, async_checkpoints=False)
    config.data.cache = False  # tokenizing is faster than writing a zarr cache per run
    if paths:
        config.data.paths = tuple(paths)
    return config


class _TimedIterator:
    """A data iterator that adds the seconds spent in `next` to `seconds`."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - t0


class _Trainer:
    """One strategy's experiment, state, step runner and data iterator."""

    def __init__(self, config, packing: str, workdir: str):
        config = config.copy_and_resolve_references()
        config.data.packing = packing
        self.exp = Experiment(config, workdir)
        self.data = _TimedIterator(iter(self.exp.dataset("train")))
        self.state = self.exp.restore_or_init()
        self.runner = StepRunner(self.exp, config.train.batch_size)
        self.step = 0

    def run(self, steps: int) -> dict:
        """Train `steps` steps; wall time, pipeline time and the batches' statistics."""
        self.data.seconds = 0.0
        target_tokens, padding = 0, []
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            self.state, metrics, stats = self.runner(self.state, self.data, self.step)
            target_tokens += stats["target_tokens"]
            padding.append(stats["padding_fraction"])
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - t0
        return {
            "tokens_per_sec": target_tokens / seconds,
            "padding_fraction": statistics.fmean(padding),
            "step_ms": 1e3 * seconds / steps,
            "pipeline_ms": 1e3 * self.data.seconds / steps,
            "target_tokens_per_step": target_tokens / steps,
        }

    def close(self):
        self.exp.checkpointer.close()


def _spread(values) -> dict:
    """Median, min and max of a list of floats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(config, *, steps: int = 5, repeats: int = 3, warmup: int = 2) -> dict:
    """Time packed and padded training side by side.

    Args:
      config: a configs/lm_tiny.py config (see `benchmark_config`); only
        `data.packing` differs between the two runs.
      steps: training steps per timed repeat.
      repeats: timed repeats per strategy, interleaved between strategies.
      warmup: untimed steps first (the first one compiles).

    Returns:
      {"settings": ..., "results": {strategy: {sample: {median, min, max}}},
       "ratio": {median, min, max} of packed/padded tokens/s over paired repeats,
       "token_ratio": packed/padded mean target tokens per step}.
    """
    if steps < 1 or repeats < 1 or warmup < 1:
        raise ValueError(f"{steps=}, {repeats=} and {warmup=} must all be >= 1")
    samples = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory(prefix="lcx-bench-") as tmp:
        trainers = {s: _Trainer(config, s, os.path.join(tmp, s)) for s in STRATEGIES}
        try:
            for trainer in trainers.values():
                trainer.run(warmup)
            for _ in range(repeats):
                for strategy, trainer in trainers.items():
                    samples[strategy].append(trainer.run(steps))
        finally:
            for trainer in trainers.values():
                trainer.close()
    results = {s: {k: _spread([r[k] for r in rs]) for k, rs in _columns(samples[s]).items()}
               for s in STRATEGIES}
    ratios = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(samples[PACKED], samples[PADDED])]
    tokens = {s: statistics.fmean(r["target_tokens_per_step"] for r in samples[s]) for s in STRATEGIES}
    return {
        "settings": _settings(config, steps=steps, repeats=repeats, warmup=warmup),
        "results": results,
        "ratio": _spread(ratios),
        "token_ratio": tokens[PACKED] / tokens[PADDED],
    }
