"""Loss by token position: do later tokens of a document gain from the earlier ones?

Held-out documents (each at most `max_length` tokens, never cut into pieces that lose
their start) are scored in packed rows; every token's loss is put in the bucket of its
position in the document (0-512, 512-2K, 2K-8K, ... by default). A model that uses
distant context shows a falling curve as far as its documents reach.
"""

from __future__ import annotations

import numpy as np

from lcx import plots
from lcx.errors import UserError

BUCKETS = (0, 512, 2048, 8192, 32768, 131072, 524288)


def loss_by_position(lm, documents, max_length: int, buckets=BUCKETS) -> list[dict]:
    """Per bucket [lo, hi) of target positions: mean loss, tokens and documents counted."""
    sequences = [list(np.asarray(d[:max_length]).tolist()) for d in documents if len(d) > 1]
    if not sequences:
        raise UserError("evals: no held-out document has two tokens to score")
    edges = [b for b in buckets if b < max_length] + [max_length]
    sums, counts, docs = (
        np.zeros(len(edges) - 1),
        np.zeros(len(edges) - 1),
        np.zeros(len(edges) - 1),
    )
    for logprob, _ in lm.score_tokens(sequences):
        positions = np.arange(1, len(logprob) + 1)  # the position of each predicted token
        which = np.searchsorted(edges, positions, side="right") - 1
        np.add.at(sums, which, -logprob)
        np.add.at(counts, which, 1)
        docs[np.unique(which)] += 1
    return [
        {
            "start": int(lo),
            "end": int(hi),
            "loss": float(s / c) if c else None,
            "tokens": int(c),
            "documents": int(d),
        }
        for lo, hi, s, c, d in zip(edges[:-1], edges[1:], sums, counts, docs, strict=True)
    ]


def plot_loss_by_position(curves: dict[str, list[dict]], path: str) -> str:
    """A PNG of loss against position (one line per curve name); returns `path`."""
    return plots.save(plots.loss_by_position(curves), path)
