"""Paged caches (lcx.paged_cache): tokens land in their slots' pages, and a ragged step
reads only each group's own pages and equals float64 attention over each slot's own
sequence, decode tokens and prompt-chunk blocks alike, with and without a window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.cache import CHUNK_QUERY_BLOCK
from lcx.paged_cache import PagedAttentionCache, PageLayout, paged_cache_attention, ragged_work

SLOTS, PAGE, PAGES, K, H, D = 3, 4, 24, 2, 4, 8


def _reference(q, keys, values, q_index, seen, window):
    """float64 causal attention of one query over a slot's keys [0, seen): (out, lse)."""
    at = np.arange(seen)
    visible = at <= q_index
    if window is not None:
        visible &= q_index - at < window
    out, lse = np.zeros((H, D)), np.full(H, -np.inf)
    for h in range(H):
        kv = h // (H // K)
        if not visible.any():
            continue
        logits = keys[at[visible], kv] @ q[h] / np.sqrt(D)
        lse[h] = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        out[h] = np.exp(logits - lse[h]) @ values[at[visible], kv]
    return out, lse


@pytest.mark.parametrize("window", [None, 6])
def test_ragged_paged_step_equals_float64_per_slot_attention(rng, window):
    # Slot 0 decodes at index 9, slot 1 prefills a 20-token chunk from index 3 (two
    # blocks), slot 2 decodes at index 0; pages handed out shuffled, offset 2 on slot 1.
    offset = np.array([0, 2, 0], np.int32)
    lengths = [10, 23, 1]  # after this step's writes
    order = rng.permutation(PAGES)
    table = np.zeros((SLOTS, 8), np.int32)
    for s, n in enumerate(lengths):
        table[s, : -(-n // PAGE)], order = order[: -(-n // PAGE)], order[-(-n // PAGE) :]
    keys = [rng.standard_normal((n, K, D)) for n in lengths]
    values = [rng.standard_normal((n, K, D)) for n in lengths]
    # Everything before this step, written as one packed row of earlier tokens.
    x64 = jax.enable_x64(True)
    x64.__enter__()
    cache = PagedAttentionCache.zeros(PAGES, PAGE, K, D, jnp.float64)
    before = [(0, 9), (1, 3), (2, 0)]
    ids = np.concatenate([np.full(n, s + 1) for s, n in before])[None]
    pos = np.concatenate([np.arange(n) + offset[s] for s, n in before])[None]
    k_row = np.concatenate([keys[s][:n] for s, n in before])[None]
    v_row = np.concatenate([values[s][:n] for s, n in before])[None]
    layout = PageLayout(jnp.asarray(table))
    cache = cache.write(
        k_row, v_row, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(offset), pages=layout
    )
    # This step: decode queries in places 0..2, then slot 1's chunk in two blocks.
    width = SLOTS + 2 * CHUNK_QUERY_BLOCK
    seg, positions = np.zeros(width, np.int32), np.zeros(width, np.int32)
    index = np.zeros(width, np.int32)
    seg[[0, 2]], index[[0, 2]] = [1, 3], [9, 0]
    seg[SLOTS : SLOTS + 20], index[SLOTS : SLOTS + 20] = 2, np.arange(3, 23)
    positions = index + offset[np.maximum(seg - 1, 0)]
    step_k, step_v = np.zeros((1, width, K, D)), np.zeros((1, width, K, D))
    for t in np.flatnonzero(seg):
        step_k[0, t], step_v[0, t] = keys[seg[t] - 1][index[t]], values[seg[t] - 1][index[t]]
    lists, real = ragged_work(seg, positions, SLOTS, offset, PAGE, window)
    if window is None:
        assert real == (3 + 1, 5 + 6)  # slot 0: pages 0-2; slot 2: 0; blocks: 0-4, 0-5
    else:  # the window of 6 hides pages wholly before index - 5
        assert real == (2 + 1, 5 + 3)
    layout = PageLayout(jnp.asarray(table), *map(jnp.asarray, lists))
    q = rng.standard_normal((1, width, H, D))

    @jax.jit
    def step(cache, q, k, v, seg, positions, offset):
        """One engine step's attention: write, then read."""
        cache = cache.write(k, v, seg, positions, offset, pages=layout)
        return paged_cache_attention(
            q, seg, positions, cache, layout, offset_S=offset, window=window
        )

    out, lse = step(cache, q, step_k, step_v, seg[None], positions[None], offset)
    x64.__exit__(None, None, None)
    for t in range(width):
        if seg[t] == 0:
            assert not np.asarray(out[0, t]).any() and np.isneginf(lse[0, t]).all()
            continue
        s = seg[t] - 1
        want_out, want_lse = _reference(q[0, t], keys[s], values[s], index[t], lengths[s], window)
        np.testing.assert_allclose(out[0, t], want_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse[0, t], want_lse, rtol=1e-12)
