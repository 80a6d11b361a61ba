"""Offline first-fit-decreasing bin packing, O(n log n).

Items sorted once by decreasing length; each goes to the leftmost bin with room, found
in O(log n) by descending a max-segment tree over the bins' remaining capacities (bins
not opened yet hold the full capacity, so the leftmost fit is an open bin or the next
new one). FFD uses at most 11/9 OPT + 6/9 bins (Dósa 2007). grain's packers are online
(first-fit over a few open bins); this one sees the whole epoch, as prepacked prefill
(Prepacking, arXiv 2404.09529) and offline packing of a finite corpus want.
"""

from __future__ import annotations

import numpy as np


def _check(lengths: np.ndarray, capacity) -> None:
    """ValueError for a capacity <= 0, a non-1-D or negative length, or one over capacity."""
    if not isinstance(capacity, int | np.integer) or capacity <= 0:
        raise ValueError(f"capacity={capacity!r} must be a positive integer")
    if lengths.ndim != 1 or (lengths.size and lengths.min() < 0):
        raise ValueError(f"lengths must be a 1-D array of non-negative integers; got {lengths}")
    if lengths.size and lengths.max() > capacity:
        i = int(np.argmax(lengths))
        raise ValueError(
            f"lengths[{i}]={int(lengths[i])} exceeds capacity={capacity}; split documents "
            "longer than a row first (lcx.packing.DocumentPieces does)"
        )


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Indices of `lengths` per bin; every index once, every bin's sum <= capacity.

    Refuses (ValueError) an item longer than `capacity` rather than splitting it, so
    the indices keep meaning the caller's items.
    """
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu" and lengths.size:
        raise ValueError(f"lengths must be integers; got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    _check(lengths, capacity)
    n = len(lengths)
    if n == 0:
        return []
    leaves = 1 << max(0, (n - 1).bit_length())
    # tree[1] is the root; leaves at [leaves, 2 * leaves). Python lists: scalar access
    # in the loop below is several times faster than on numpy arrays.
    tree = [int(capacity)] * (2 * leaves)
    bins: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[index])
        node = 1
        while node < leaves:  # descend to the leftmost leaf with room
            node = 2 * node if tree[2 * node] >= size else 2 * node + 1
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(index)
        tree[node] -= size
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins
