"""Shared inputs for the attention tests: packed layouts with every edge case, float64 references.

Every layout helper takes the seeded `rng` fixture's generator. A "case" is q, k, v and
the keyword arguments of one `packed_attention` call (segment ids, positions, mask).
The random layouts and the float64 checks live in `lcx.attention.testing` (the GPU
check uses them too); the layouts only the tests need are here.
"""

from __future__ import annotations

import numpy as np

from lcx.attention.testing import (  # noqa: F401  (re-exported for the tests)
    chunk_against_earlier_chunks,
    document_positions,
    qkv,
    random_layout,
    reference_values_and_grads,
    relative_error,
    values_and_grads,
    weights,
)


def edge_layouts(t: int, block: int) -> np.ndarray:
    """Rows: one document; one-token documents; starts on and just after a block boundary;
    all padding; padding in the middle. T need not be a multiple of the block."""
    rows = np.zeros((5, t), np.int32)
    rows[0] = 7
    rows[1] = np.arange(1, t + 1)
    rows[2, :block] = 1
    rows[2, block : block + 1] = 2
    rows[2, block + 1 : 2 * block] = 3
    rows[2, 2 * block :] = 4
    # rows[3] stays all padding
    rows[4, : t // 3] = 5
    rows[4, t // 3 : t // 2] = 0
    rows[4, t // 2 :] = 9
    return rows


def few_queries_per_row(rng, b, tq, tk):
    """(segment kwargs, Tq): rows of `tq` queries (a few tokens of one sequence each, as
    in batched decoding) against `tk` packed keys: each row's queries continue one of its
    documents from a random position inside it or just past its end; row 0's queries are
    padding, row 1's id has no key."""
    seg = random_layout(rng, b, tk)
    pos = document_positions(seg)
    q_seg, q_pos = np.zeros((b, tq), np.int32), np.zeros((b, tq), np.int32)
    for row in range(b):
        doc = int(rng.choice(seg[row][seg[row] > 0]))
        q_seg[row] = doc
        q_pos[row] = int(rng.integers(0, np.sum(seg[row] == doc) + 2)) + np.arange(tq)
    q_seg[0], q_seg[1] = 0, 1000
    kwargs = dict(segment_ids=q_seg, kv_segment_ids=seg, q_positions=q_pos, kv_positions=pos)
    return kwargs, tq


def decode_against_cache(rng, slots, cache_len):
    """(segment kwargs, Tq): one query per sequence slot at its next position against a
    cache of `slots` x `cache_len` entries (slot s holds id s + 1 up to its length, then
    padding); one slot is empty, so its query sees nothing."""
    lengths = rng.integers(1, cache_len + 1, slots)
    lengths[int(rng.integers(slots))] = 0
    idx = np.arange(cache_len)
    cache_seg = np.concatenate([np.where(idx < n, s + 1, 0) for s, n in enumerate(lengths)])
    cache_pos = np.tile(idx, slots)
    kwargs = dict(
        segment_ids=np.arange(1, slots + 1, dtype=np.int32)[None],
        kv_segment_ids=cache_seg[None].astype(np.int32),
        q_positions=np.maximum(lengths - 1, 0).astype(np.int32)[None],
        kv_positions=cache_pos[None].astype(np.int32),
    )  # fmt: skip
    return kwargs, slots
