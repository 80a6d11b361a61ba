"""One packed row from document pieces: tokens, segment ids (1, 2, ...; 0 = padding), positions."""

from __future__ import annotations

import numpy as np


def packed_row(pieces, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The pieces back to back in a row of `length`, positions restarting per piece."""
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
    return row
