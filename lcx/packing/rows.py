"""One packed row from document pieces: tokens, segment ids (1, 2, ...; 0 = padding),
positions, and the pieces' loss weights when they carry them (0 on padding)."""

from __future__ import annotations

import numpy as np


def packed_row(pieces, length: int, pad_id: int, weights=None) -> dict[str, np.ndarray]:
    """The pieces back to back in a row of `length`, positions restarting per piece;
    `weights` (one array per piece, or None) become the row's float32 `weights`."""
    row = {
        "tokens": np.full(length, pad_id, np.int32),
        "segment_ids": np.zeros(length, np.int32),
        "positions": np.zeros(length, np.int32),
    }
    pos = 0
    for segment, tokens in enumerate(pieces, start=1):
        n = len(tokens)
        row["tokens"][pos : pos + n] = tokens
        row["segment_ids"][pos : pos + n] = segment
        row["positions"][pos : pos + n] = np.arange(n)
        pos += n
    if weights is not None:
        row["weights"] = np.zeros(length, np.float32)
        row["weights"][:pos] = np.concatenate(list(weights) or [np.zeros(0)])
    return row
