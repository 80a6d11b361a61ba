"""`WORKDIR/metrics.jsonl` (one JSON object per logged step) and the progress bar."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm


def _plain(value):
    """JSON-serialisable Python scalar from a numpy / jax scalar."""
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
    """Appends metric dicts to metrics.jsonl; only process 0 writes."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, record: dict):
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()}, sort_keys=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def read_metrics(workdir: str) -> list[dict]:
    """Every record of WORKDIR/metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar over training steps showing loss, real tokens/s and padding (ETA by tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        enabled = enabled and jax.process_index() == 0
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            desc="train",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def update(self, step: int, record: dict | None = None):
        self.bar.n = step
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                tok_s=f"{record['tokens_per_sec']:.0f}",
                pad=f"{record['padding_fraction']:.1%}",
                refresh=False,
            )
        self.bar.refresh()

    def write(self, message: str):
        self.bar.write(message, file=sys.stderr)

    def close(self):
        self.bar.close()


class MetricsWindow:
    """Aggregates steps between log lines; reads a step's device metrics one step late.

    `add` keeps the newest step pending and logs the previous one, whose metrics are
    ready by then, so the host never waits on the step it just dispatched.
    """

    def __init__(self, writer: MetricsWriter, progress: Progress, always=()):
        self.writer, self.progress, self.always = writer, progress, set(always)
        self.pending, self.last = None, {}
        self._reset()

    def _reset(self):
        self.real_tokens, self.target_tokens, self.padding = 0, 0, []
        self.t0 = time.perf_counter()

    def add(self, step: int, metrics: dict, host_stats: dict, *, log: bool):
        """Record a dispatched step; logs the previous pending one."""
        self.flush()
        self.pending = (step, metrics, host_stats, log or step in self.always)

    def flush(self):
        """Fold the pending step in, writing a record if it is a log step."""
        if self.pending is None:
            return
        step, metrics, stats, log = self.pending
        self.pending = None
        self.real_tokens += stats["real_tokens"]
        self.target_tokens += stats["target_tokens"]
        self.padding.append(stats["padding_fraction"])
        if not log:
            return
        # Wait for the step first: with asynchronous dispatch, the clock before device_get
        # would count dispatch time only and overstate tokens/s many times.
        record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "target_tokens"}
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record.update(
            step=step,
            batch_size=int(record["batch_size"]),
            tokens_per_sec=self.target_tokens / elapsed,
            real_tokens_per_sec=self.real_tokens / elapsed,
            padding_fraction=float(np.mean(self.padding)),
        )
        self.writer.write(record)
        self.progress.update(step, record)
        self.last = record
        self._reset()

    def write_eval(self, step: int, eval_loss: float):
        """An eval record; evaluation time does not count as training time."""
        self.writer.write({"step": step, "eval_loss": eval_loss})
        self.progress.write(f"step {step}: eval_loss {eval_loss:.4f}")
        self.last = self.last | {"eval_loss": eval_loss}
        self._reset()
