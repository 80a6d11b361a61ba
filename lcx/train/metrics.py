"""`WORKDIR/metrics.jsonl` (one JSON object per logged step) and the progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm


def _plain(value):
    """JSON-serialisable Python value from a numpy / jax scalar; NaN and inf become None."""
    value = np.asarray(value)
    if value.ndim:
        return value.tolist()
    value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _kind(record: dict) -> str:
    """'eval' for an evaluation record, 'train' for a training step's."""
    return "eval" if "eval_loss" in record and "loss" not in record else "train"


class MetricsWriter:
    """Appends metric dicts to metrics.jsonl (strict JSON); only process 0 writes.

    One record per (step, kind): a resumed run first drops the records after its
    checkpoint (`truncate_after`), and an evaluation replaces an earlier one of the
    same step.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, record: dict):
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        if _kind(record) == "eval":
            self._keep(lambda r: not (_kind(r) == "eval" and r.get("step") == record["step"]))
        line = json.dumps(record, sort_keys=True, allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def truncate_after(self, step: int):
        """Drop the records of steps after `step` (a resume trains them again)."""
        if self.enabled:
            self._keep(lambda r: r.get("step", 0) <= step)

    def _keep(self, keep):
        """Rewrite the file with the records for which `keep(record)` holds."""
        if not os.path.exists(self.path):
            return
        records = _read(self.path)
        if all(keep(r) for r in records):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in records:
                if keep(r):
                    f.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def _read(path: str) -> list[dict]:
    """The records of a metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl in order, the last one per (step, kind)."""
    records = _read(os.path.join(workdir, "metrics.jsonl"))
    last = {(r.get("step"), _kind(r)): i for i, r in enumerate(records)}
    return [r for i, r in enumerate(records) if last[(r.get("step"), _kind(r))] == i]


class Progress:
    """A tqdm bar over training steps showing loss, real tokens/s and padding.

    The ETA is the mean time per step since the first update, so the first step's
    compilation does not show as hours to go.
    """

    def __init__(self, total: int, initial: int, enabled: bool):
        enabled = enabled and jax.process_index() == 0
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            desc="train",
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
        )
        self._timing_from_here = True

    def update(self, step: int, record: dict | None = None):
        if self._timing_from_here and not self.bar.disable:  # restart the clock after step 1
            self.bar.reset(total=self.bar.total)
            self.bar.initial = step
            self._timing_from_here = False
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
        if jax.process_index() == 0:
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
