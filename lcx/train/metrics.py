"""`WORKDIR/metrics.jsonl` (one JSON object per logged step) and the progress bar."""

from __future__ import annotations

import json
import os
import sys

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
