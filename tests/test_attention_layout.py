"""Block schedules and the TPU kernels' work lists: exact against the element mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.attention import Segments, block_schedule, count_visited, visibility_mask
from lcx.attention.layout import dense_causal_blocks, token_ranges
from lcx.attention.step_list import COMPUTE, FIRST, FULL, LAST, groups_of, step_window
from tests import attention_cases as cases

MASKS = [(True, None), (True, 3), (False, None), (False, 5)]


def _ranges_from_mask(mask):
    """Per query the first/last visible key, per key the first/last query (empty: BIG, -1)."""
    big = 2**30
    seen_q, seen_k = mask.any(-1), mask.any(1)
    tq, tk = mask.shape[1:]
    key_lo = np.where(seen_q, mask.argmax(-1), big)
    key_hi = np.where(seen_q, tk - 1 - mask[:, :, ::-1].argmax(-1), -1)
    query_lo = np.where(seen_k, mask.argmax(1), big)
    query_hi = np.where(seen_k, tq - 1 - mask[:, ::-1, :].argmax(1), -1)
    return key_lo, key_hi, query_lo, query_hi


def _check_ranges(segments, mask_kwargs, **mask):
    want = _ranges_from_mask(np.asarray(visibility_mask(**mask_kwargs, **mask)))
    (key_lo, key_hi), (query_lo, query_hi) = token_ranges(segments, **mask)
    for name, got, ref in zip(("key lo", "key hi", "query lo", "query hi"),
                              (key_lo, key_hi, query_lo, query_hi), want, strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), ref, name)


@pytest.mark.parametrize("causal,window", MASKS)
def test_self_attention_ranges_equal_the_mask_on_both_paths(rng, causal, window):
    seg = np.concatenate([cases.random_layout(rng, 3, 24), cases.edge_layouts(24, 8)])
    ids = jnp.asarray(seg)
    index = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), seg.shape)
    mask = dict(causal=causal, window=window)
    _check_ranges(Segments(ids), dict(segment_ids_BxT=seg), **mask)  # O(T) scans
    _check_ranges(Segments(ids, ids, index, index), dict(segment_ids_BxT=seg), **mask)  # search


@pytest.mark.parametrize("causal,window", MASKS)
def test_cross_attention_ranges_equal_the_mask(rng, causal, window):
    call, _ = cases.chunk_against_earlier_chunks(rng, b=3, tk=40, chunk=16)
    segments = Segments(*(jnp.asarray(call[n]) for n in (
        "segment_ids", "kv_segment_ids", "q_positions", "kv_positions")))  # fmt: skip
    mask_kwargs = dict(segment_ids_BxT=call.pop("segment_ids"), **call)
    _check_ranges(segments, mask_kwargs, causal=causal, window=window)
    call, _ = cases.decode_against_cache(rng, slots=4, cache_len=10)
    segments = Segments(*(jnp.asarray(call[n]) for n in (
        "segment_ids", "kv_segment_ids", "q_positions", "kv_positions")))  # fmt: skip
    mask_kwargs = dict(segment_ids_BxT=call.pop("segment_ids"), **call)
    _check_ranges(segments, mask_kwargs, causal=causal, window=window)


def test_block_intervals_cover_exactly_the_visible_blocks(rng):
    # Every visible (q, k) pair lies in a scheduled block; "full" blocks are fully visible.
    call, _ = cases.chunk_against_earlier_chunks(rng, b=2, tk=64, chunk=32)
    seg = call.pop("segment_ids")
    mask = np.asarray(visibility_mask(seg, **call))
    sched = block_schedule(seg, block_q=8, block_kv=16, **call)
    blocks = mask.reshape(2, 4, 8, 4, 16).transpose(0, 1, 3, 2, 4)  # [B, nq, nk, 8, 16]
    for name, lo, hi, full_lo, full_hi, axis_blocks in [
        ("kv", sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi, blocks),
        ("q", sched.q_lo, sched.q_hi, sched.q_full_lo, sched.q_full_hi,
         blocks.transpose(0, 2, 1, 4, 3)),
    ]:  # fmt: skip
        other = np.arange(axis_blocks.shape[2])
        inside = (other >= np.asarray(lo)[..., None]) & (other <= np.asarray(hi)[..., None])
        full = (other >= np.asarray(full_lo)[..., None]) & (other <= np.asarray(full_hi)[..., None])
        any_visible = axis_blocks.any(axis=(-1, -2))
        all_visible = axis_blocks.all(axis=(-1, -2))
        assert np.all(inside | ~any_visible), f"{name}: a visible block is not scheduled"
        assert np.all(all_visible | ~full), f"{name}: a 'full' block has masked pairs"


def test_skipping_counts_on_known_layouts():
    # 16 documents of 128 tokens in a 2,048 row with 128 blocks: 16 blocks, not 136.
    seg = np.repeat(np.arange(1, 17, dtype=np.int32), 128)[None]
    sched = block_schedule(seg, block_q=128, block_kv=128)
    assert int(count_visited(sched.kv_lo, sched.kv_hi)[0]) == 16
    assert int(count_visited(sched.q_lo, sched.q_hi)[0]) == 16
    assert dense_causal_blocks(2048, 128, 128) == 136


def test_work_list_windows_visit_every_scheduled_block_once(rng):
    seg = cases.random_layout(rng, 3, 96)
    seg[1, 40:] = 0  # empty q blocks: one entry each that computes nothing
    sched = block_schedule(seg, block_q=8, block_kv=8)
    groups = groups_of(sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi)
    seen, first, capacity = [], 0, 13  # >= the 12 kv blocks of a row
    while first < groups.lo.shape[0]:
        steps, first = step_window(groups, jnp.int32(first), capacity)
        n = int(steps.length[0])
        assert 0 < n <= capacity
        flags = np.asarray(steps.flags)[:n]
        seen += list(zip(np.asarray(steps.group)[:n], np.asarray(steps.block)[:n], flags,
                         strict=True))  # fmt: skip
        assert flags[0] & FIRST and flags[-1] & LAST  # windows hold whole groups
        first = int(first)
    lo, hi = np.asarray(sched.kv_lo).reshape(-1), np.asarray(sched.kv_hi).reshape(-1)
    full_lo, full_hi = (
        np.asarray(sched.kv_full_lo).reshape(-1),
        np.asarray(sched.kv_full_hi).reshape(-1),
    )
    want = []
    for g in range(len(lo)):
        if hi[g] < lo[g]:
            want.append((g, 0, FIRST | LAST))
            continue
        for j in range(lo[g], hi[g] + 1):
            flags = COMPUTE | (FULL if full_lo[g] <= j <= full_hi[g] else 0)
            flags |= (FIRST if j == lo[g] else 0) | (LAST if j == hi[g] else 0)
            want.append((g, j, flags))
    assert [tuple(int(x) for x in e) for e in seen] == want


def test_million_token_rows_schedule_without_quadratic_memory():
    t = 1 << 20
    seg = jnp.repeat(jnp.arange(1, 257, dtype=jnp.int32), t // 256)[None]
    sched = jax.jit(lambda s: block_schedule(s, block_q=128, block_kv=128))(seg)
    assert sched.kv_lo.shape == (1, t // 128)
    assert int(count_visited(sched.kv_lo, sched.kv_hi)[0]) == 256 * (32 * 33 // 2)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of block_q=16"):
        block_schedule(np.ones((1, 40), np.int32), block_q=16, block_kv=8)
    with pytest.raises(ValueError, match="kv_segment_ids must be"):
        block_schedule(np.ones((1, 32)), block_q=16, block_kv=16, kv_segment_ids=np.ones((1, 40)))
