"""Paged caches (lcx.paged_cache): tokens land in their slots' pages, and a ragged step
reads only each group's own pages and equals float64 attention over each slot's own
sequence, decode tokens and prompt-chunk blocks alike, with and without a window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.attention import ragged_paged_xla
from lcx.cache import CHUNK_QUERY_BLOCK
from lcx.paged_cache import (
    PagedAttentionCache,
    PageLayout,
    paged_cache_attention,
    ragged_reads,
    ragged_work,
)

SLOTS, PAGE, PAGES, K, H, D = 3, 4, 24, 2, 4, 8


def _reference(q, keys, values, q_index, seen, window):
    """float64 causal attention of one query over a slot's keys [0, seen): (out, lse)."""
    (heads, d), kv_heads = q.shape, keys.shape[1]
    at = np.arange(seen)
    visible = at <= q_index
    if window is not None:
        visible &= q_index - at < window
    out, lse = np.zeros((heads, d)), np.full(heads, -np.inf)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        if not visible.any():
            continue
        logits = keys[at[visible], kv] @ q[h] / np.sqrt(d)
        lse[h] = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        out[h] = np.exp(logits - lse[h]) @ values[at[visible], kv]
    return out, lse


def paged_step(
    rng, window, dtype=jnp.float64, decode_width=1, host_lists=True, heads=(H, K, D),
    **attention,
):  # fmt: skip
    """One engine step against a paged cache in `dtype`, `attention` passed to
    `paged_cache_attention`, its work lists from the host (`ragged_work`) or, without
    `host_lists`, built in the step, with `heads` (q heads, kv heads, head dim): (out
    [1, T, H, D], lse [1, T, H], wants, real item counts),
    wants[t] the float64 reference (out, lse) of query t on the inputs rounded to `dtype`,
    None for padding.

    Slot 0 decodes at index 9, slot 1 prefills a 20-token chunk from index 3 (two blocks),
    slot 2 decodes at index 0; pages handed out shuffled, offset 2 on slot 1. With
    `decode_width` C > 1 the decode part holds C places per slot and slot 0 verifies C
    tokens ending at index 9 (a last token and its drafts).
    """
    c, (q_heads, kv_heads, d) = decode_width, heads
    rounded = lambda x: x.astype(jnp.dtype(dtype)).astype(np.float64)  # noqa: E731
    offset = np.array([0, 2, 0], np.int32)
    lengths = [10, 23, 1]  # after this step's writes
    order = rng.permutation(PAGES)
    table = np.zeros((SLOTS, 8), np.int32)
    for s, n in enumerate(lengths):
        table[s, : -(-n // PAGE)], order = order[: -(-n // PAGE)], order[-(-n // PAGE) :]
    keys = [rounded(rng.standard_normal((n, kv_heads, d))) for n in lengths]
    values = [rounded(rng.standard_normal((n, kv_heads, d))) for n in lengths]
    with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
        # Everything before this step, written as one packed row of earlier tokens.
        cache = PagedAttentionCache.zeros(PAGES, PAGE, kv_heads, d, dtype)
        before = [(0, 10 - c), (1, 3), (2, 0)]
        ids = np.concatenate([np.full(n, s + 1) for s, n in before])[None]
        pos = np.concatenate([np.arange(n) + offset[s] for s, n in before])[None]
        k_row = np.concatenate([keys[s][:n] for s, n in before])[None]
        v_row = np.concatenate([values[s][:n] for s, n in before])[None]
        layout = PageLayout(jnp.asarray(table))
        cache = cache.write(
            k_row, v_row, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(offset), pages=layout
        )
        # This step: C decode places per slot, then slot 1's chunk in two blocks.
        width = SLOTS * c + 2 * CHUNK_QUERY_BLOCK
        seg, positions = np.zeros(width, np.int32), np.zeros(width, np.int32)
        index = np.zeros(width, np.int32)
        seg[:c], index[:c] = 1, np.arange(10 - c, 10)
        seg[2 * c], index[2 * c] = 3, 0
        chunk = slice(SLOTS * c, SLOTS * c + 20)
        seg[chunk], index[chunk] = 2, np.arange(3, 23)
        positions = index + offset[np.maximum(seg - 1, 0)]
        step_k, step_v = np.zeros((1, width, kv_heads, d)), np.zeros((1, width, kv_heads, d))
        for t in np.flatnonzero(seg):
            step_k[0, t] = keys[seg[t] - 1][index[t]]
            step_v[0, t] = values[seg[t] - 1][index[t]]
        lists, real = ragged_work(seg, positions, SLOTS, offset, PAGE, window, SLOTS * c)
        assert ragged_reads(seg, positions, SLOTS, offset, PAGE, window, SLOTS * c) == real
        layout = PageLayout(jnp.asarray(table), *map(jnp.asarray, lists if host_lists else ()))
        q = rounded(rng.standard_normal((1, width, q_heads, d)))

        @jax.jit
        def step(cache, q, k, v, seg, positions, offset):
            """One engine step's attention: write, then read."""
            cache = cache.write(k, v, seg, positions, offset, pages=layout)
            return paged_cache_attention(
                q, seg, positions, cache, layout, offset_S=offset, window=window,
                decode_rows=SLOTS * c, **attention,
            )  # fmt: skip

        as_dtype = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        out, lse = step(
            cache, *map(as_dtype, (q, step_k, step_v)), seg[None], positions[None], offset
        )
    wants = [
        None
        if seg[t] == 0
        else _reference(
            q[0, t], keys[seg[t] - 1], values[seg[t] - 1], index[t], lengths[seg[t] - 1], window
        )
        for t in range(width)
    ]
    return out, lse, wants, real


def assert_matches(out, lse, wants, *, rtol, atol):
    """out, lse equal their wants; padding queries get 0 and lse -inf."""
    for t, want in enumerate(wants):
        if want is None:
            assert not np.asarray(out[0, t]).any() and np.isneginf(lse[0, t]).all()
            continue
        np.testing.assert_allclose(np.asarray(out[0, t], np.float64), want[0], rtol, atol)
        np.testing.assert_allclose(lse[0, t], want[1], rtol, atol)


@pytest.mark.parametrize("host_lists", [True, False], ids=["host lists", "lists in the step"])
@pytest.mark.parametrize("window, decode_width", [(None, 1), (6, 1), (6, 3)])
def test_ragged_paged_step_equals_float64_per_slot_attention(rng, window, decode_width, host_lists):
    out, lse, wants, real = paged_step(rng, window, decode_width=decode_width,
                                       host_lists=host_lists)  # fmt: skip
    if window is None:
        assert real == (3 + 1, 5 + 6)  # slot 0: pages 0-2; slot 2: 0; blocks: 0-4, 0-5
    else:  # the window of 6 hides pages wholly before index - 5 (of slot 0's first query)
        assert real == (2 + (decode_width > 2) + 1, 5 + 3)
    assert_matches(out, lse, wants, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("host_lists", [True, False], ids=["host lists", "lists in the step"])
@pytest.mark.parametrize("window", [None, 6])
def test_the_xla_read_folds_item_blocks_and_stops_at_the_last_real_one(
    rng, window, host_lists, monkeypatch, loop_runs
):
    """With blocks of 2 items, the decode list (4 real items; 3 with the window) runs 2
    blocks and the chunk list (11; 8) 6 (4), counted as loop-body runs, whether the list
    is the host's (padded to 8 and 16) or the step's own (padded to 3 * 8 and 2 * 8
    items); the online softmax across blocks still equals float64 attention."""
    monkeypatch.setattr(ragged_paged_xla, "ITEM_BLOCK", 2)
    out, lse, wants, real = paged_step(
        rng, window, decode_width=1, host_lists=host_lists, implementation="xla"
    )
    jax.effects_barrier()
    assert real == ((4, 11) if window is None else (3, 8))
    assert len(loop_runs) == (2 + 6 if window is None else 2 + 4)
    assert_matches(out, lse, wants, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window, decode_width", [(None, 1), (5, 1), (None, 3), (5, 3)])
def test_work_built_on_the_device_lists_the_hosts_items(rng, window, decode_width):
    """`work_in_graph` (the one-stretch cache's work list, built in the step) names the
    same (group, page) items, in the same order, as the host's `ragged_work`, padding
    after; random rows of idle and busy slots and chunk blocks."""
    slots, c, page, per_slot, blocks = 4, decode_width, 4, 8, 3
    for _ in range(5):
        offset = rng.integers(0, 3, slots).astype(np.int32)
        seg = np.zeros(slots * c + blocks * CHUNK_QUERY_BLOCK, np.int32)
        index = np.zeros_like(seg)
        for s in np.flatnonzero(rng.random(slots) < 0.7):
            n = int(rng.integers(1, c + 1))
            last = int(rng.integers(n - 1, page * per_slot))
            seg[s * c : s * c + n], index[s * c : s * c + n] = (
                s + 1,
                np.arange(last - n + 1, last + 1),
            )
        for b in np.flatnonzero(rng.random(blocks) < 0.7):
            s, n = int(rng.integers(0, slots)), int(rng.integers(1, CHUNK_QUERY_BLOCK + 1))
            start = int(rng.integers(0, page * per_slot - n + 1))
            at = slots * c + b * CHUNK_QUERY_BLOCK
            seg[at : at + n], index[at : at + n] = s + 1, np.arange(start, start + n)
        positions = index + offset[np.maximum(seg - 1, 0)]
        lists, real = ragged_work(seg, positions, slots, offset, page, window, slots * c)
        decode_real = seg[: slots * c].reshape(slots, c) == np.arange(1, slots + 1)[:, None]
        decode_index = index[: slots * c].reshape(slots, c)
        chunk_seg = seg[slots * c :].reshape(blocks, CHUNK_QUERY_BLOCK)
        chunk_real = (chunk_seg == chunk_seg.max(axis=1, keepdims=True)) & (chunk_seg > 0)
        chunk_index = index[slots * c :].reshape(blocks, CHUNK_QUERY_BLOCK)
        for (host_group, host_page), n, groups, (real_GxC, index_GxC) in zip(
            (lists[:2], lists[2:]),
            real,
            (slots, blocks),
            ((decode_real, decode_index), (chunk_real, chunk_index)),
            strict=True,
        ):
            group_W, page_W = map(np.asarray, ragged_paged_xla.work_in_graph(
                jnp.asarray(real_GxC), jnp.asarray(index_GxC), page, per_slot, window
            ))  # fmt: skip
            np.testing.assert_array_equal(group_W[:n], host_group[:n])
            np.testing.assert_array_equal(page_W[:n], host_page[:n])
            assert (group_W[n:] == groups).all()
            assert len(group_W) % ragged_paged_xla.ITEM_BLOCK == 0
