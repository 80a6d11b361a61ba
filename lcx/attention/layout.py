"""Block schedules for packed attention: which key blocks each query block must visit.

With every document one contiguous run of a segment id on each side and positions that
do not decrease inside a run, query t sees one interval of keys [lo_t, hi_t]: the run of
its segment id among the keys, cut by causality (keys whose position is at most the
query's) and by the window. Self-attention with positions = index in the row needs only
cumulative max / min scans (run starts and ends), O(T) per row. The general case (queries
against other keys: chunked prefill, decoding, ChunkFlow) finds each query's key run by
a sort of the key ids and cuts it with binary searches on the key positions,
O(T log T), still no T x T array. The transpose (per key, the queries that see it, for
the dkv pass) is the same computation with the sides swapped.

For q block i the union of its queries' intervals is covered by one interval of kv
blocks [lo, hi]; the dkv pass uses per kv block the interval of q blocks. A block pair is
"full" (no element mask needed) when every query of the block sees every key of the
other: one document, inside every query's interval.

Work counted in blocks (Prepacking, arXiv 2404.09529; Dataset Decomposition, arXiv
2405.13226): dense causal visits nb(nb+1)/2 blocks per row, this schedule
sum_i (hi_i - lo_i + 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcx.attention.segments import Segments

_BIG = 2**30


class BlockSchedule(NamedTuple):
    """Inclusive block intervals per row; hi < lo means the block visits nothing.

    kv_lo, kv_hi, kv_full_lo, kv_full_hi: int32 [B, Tq / block_q], kv blocks per q block.
    q_lo, q_hi, q_full_lo, q_full_hi: int32 [B, Tk / block_kv], q blocks per kv block.
    """

    kv_lo: jax.Array
    kv_hi: jax.Array
    kv_full_lo: jax.Array
    kv_full_hi: jax.Array
    q_lo: jax.Array
    q_hi: jax.Array
    q_full_lo: jax.Array
    q_full_hi: jax.Array


def run_bounds(segment_ids_BxT):
    """First and last index of the run each token belongs to, [B, T] each."""
    seg = jnp.asarray(segment_ids_BxT)
    t = seg.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    changes = seg[:, 1:] != seg[:, :-1]
    is_start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), changes], axis=1)
    is_end = jnp.concatenate([changes, jnp.ones_like(seg[:, :1], bool)], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
    end = jax.lax.cummin(jnp.where(is_end, idx, t), axis=1, reverse=True)
    return start, end


def _empty_where_padding(lo, hi, ids):
    """Ranges of padding tokens and reversed ranges become the empty (BIG, -1)."""
    empty = (ids == 0) | (hi < lo)
    return jnp.where(empty, _BIG, lo), jnp.where(empty, -1, hi)


def _self_ranges(ids, *, causal, window, keys):
    """Self-attention, positions = index: per query its keys (or per key its queries)."""
    start, end = run_bounds(ids)
    idx = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    if keys:
        lo, hi = start, (idx if causal else end)
    else:
        lo, hi = (idx if causal else start), end
    if window is not None:
        lo = jnp.maximum(lo, idx - window + 1)
        hi = jnp.minimum(hi, idx + window - 1)
    return _empty_where_padding(lo, hi, ids)


def _run_lookup(ids_BxT, other_ids_BxS):
    """[start, end] of the run of each id of `ids` among `other_ids` (end < start: absent)."""
    s = other_ids_BxS.shape[1]
    order = jnp.argsort(other_ids_BxS, axis=1, stable=True).astype(jnp.int32)
    sorted_ids = jnp.take_along_axis(other_ids_BxS, order, axis=1)
    search = jax.vmap(lambda a, v, side: jnp.searchsorted(a, v, side=side), (0, 0, None))
    first = search(sorted_ids, ids_BxT, "left").astype(jnp.int32)
    last = search(sorted_ids, ids_BxT, "right").astype(jnp.int32) - 1
    start = jnp.take_along_axis(order, jnp.clip(first, 0, s - 1), axis=1)
    return start, start + (last - first)


def _bounded_search(values_BxS, lo, hi, target, *, right: bool):
    """Per token, the first index in [lo, hi + 1) with value > target (right) or >= target.

    `values` must not decrease inside each [lo, hi]; a vectorised binary search of
    ceil(log2(S + 1)) steps.
    """
    s = values_BxS.shape[1]

    def step(_, bounds):
        left, stop = bounds
        mid = (left + stop) // 2
        value = jnp.take_along_axis(values_BxS, jnp.clip(mid, 0, s - 1), axis=1)
        go_right = (value <= target) if right else (value < target)
        active = left < stop
        return jnp.where(active & go_right, mid + 1, left), jnp.where(active & ~go_right, mid, stop)

    left, _ = jax.lax.fori_loop(0, math.ceil(math.log2(s + 1)), step, (lo, hi + 1))
    return left


def _cross_ranges(ids, positions, other_ids, other_positions, *, causal, window, keys):
    """Per token of one side the interval of tokens of the other side it pairs with.

    keys=True: `ids` are queries and the result is the keys each sees; keys=False: `ids`
    are keys and the result is the queries that see each.
    """
    run_lo, run_hi = _run_lookup(ids, other_ids)
    absent = (ids == 0) | (run_hi < run_lo)
    run_lo, run_hi = jnp.where(absent, 0, run_lo), jnp.where(absent, -1, run_hi)

    def first_above(target):  # first index in the run with position > target
        return _bounded_search(other_positions, run_lo, run_hi, target, right=True)

    def first_at_least(target):  # first index in the run with position >= target
        return _bounded_search(other_positions, run_lo, run_hi, target, right=False)

    reach = None if window is None else window - 1
    if keys:  # keys s with kv_pos[s] <= q_pos (causal), |q_pos - kv_pos| <= reach
        hi = first_above(positions) - 1 if causal else run_hi
        if reach is not None:
            hi = jnp.minimum(hi, first_above(positions + reach) - 1)
        lo = run_lo if reach is None else first_at_least(positions - reach)
    else:  # queries t with q_pos[t] >= kv_pos (causal), |q_pos - kv_pos| <= reach
        lo = first_at_least(positions) if causal else run_lo
        if reach is not None:
            lo = jnp.maximum(lo, first_at_least(positions - reach))
        hi = run_hi if reach is None else first_above(positions + reach) - 1
    return _empty_where_padding(lo, hi, jnp.where(absent, 0, ids))


def token_ranges(segments: Segments, *, causal=True, window=None):
    """((key_lo, key_hi) per query [B, Tq], (query_lo, query_hi) per key [B, Tk])."""
    if window is not None:  # int32 arithmetic below: a window past any row is no window
        window = min(math.ceil(window), _BIG)
    if segments.kv_ids is None and segments.q_positions is None and segments.kv_positions is None:
        ids = segments.q_ids
        keys = _self_ranges(ids, causal=causal, window=window, keys=True)
        return keys, _self_ranges(ids, causal=causal, window=window, keys=False)
    seg = segments.filled()
    mask = dict(causal=causal, window=window)
    keys = _cross_ranges(
        seg.q_ids, seg.q_positions, seg.kv_ids, seg.kv_positions, **mask, keys=True
    )
    queries = _cross_ranges(
        seg.kv_ids, seg.kv_positions, seg.q_ids, seg.q_positions, **mask, keys=False
    )
    return keys, queries


def _intervals(lo_t, hi_t, ids, block, other_block):
    """Block intervals of the union of per-token ranges, and of the full sub-range."""
    b, t = ids.shape
    shape = (b, t // block, block)
    lo, hi = lo_t.reshape(shape), hi_t.reshape(shape)
    union_lo, union_hi = lo.min(-1), hi.max(-1)
    empty = union_hi < 0
    first = jnp.where(empty, 0, union_lo // other_block)
    last = jnp.where(empty, -1, union_hi // other_block)
    # Full: one document, no padding, and the other block inside every token's range.
    run = ids.reshape(shape)
    uniform = jnp.all(run == run[..., :1], axis=-1) & (run[..., 0] != 0)
    common_lo, common_hi = lo.max(-1), hi.min(-1)
    full_first = -(-common_lo // other_block)
    full_last = (common_hi + 1) // other_block - 1
    full_empty = ~uniform | (full_last < full_first)
    full_first = jnp.where(full_empty, 0, full_first)
    full_last = jnp.where(full_empty, -1, full_last)
    return tuple(x.astype(jnp.int32) for x in (first, last, full_first, full_last))


def block_schedule(
    segment_ids,
    *,
    block_q,
    block_kv,
    causal=True,
    window=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
):
    """Per row and q block the inclusive kv-block range to visit, and the transpose.

    Args:
      segment_ids: int [B, Tq], Tq a multiple of block_q; 0 is padding.
      block_q, block_kv: block sizes of the kernels.
      causal, window: the attention mask (the `packed_attention` contract).
      kv_segment_ids: int [B, Tk], Tk a multiple of block_kv; default `segment_ids`.
      q_positions, kv_positions: int [B, Tq] / [B, Tk]; default the index in the row.

    Returns:
      A BlockSchedule of int32 arrays.
    """
    segments = Segments(
        *(
            None if x is None else jnp.asarray(x, jnp.int32)
            for x in (segment_ids, kv_segment_ids, q_positions, kv_positions)
        )
    )
    q_ids, kv_ids = segments.q_ids, segments.kv_ids_or_q
    if q_ids.ndim != 2 or q_ids.shape[1] % block_q:
        raise ValueError(
            f"segment_ids must be [B, Tq] with Tq a multiple of {block_q=}; got {q_ids.shape}"
        )
    if kv_ids.ndim != 2 or kv_ids.shape[1] % block_kv or kv_ids.shape[0] != q_ids.shape[0]:
        raise ValueError(
            f"kv_segment_ids must be [B, Tk] with Tk a multiple of {block_kv=}; got "
            f"{kv_ids.shape} (segment_ids {q_ids.shape})"
        )
    (key_lo, key_hi), (query_lo, query_hi) = token_ranges(segments, causal=causal, window=window)
    kv = _intervals(key_lo, key_hi, q_ids, block_q, block_kv)
    q = _intervals(query_lo, query_hi, kv_ids, block_kv, block_q)
    return BlockSchedule(*kv, *q)


def count_visited(lo, hi):
    """Blocks visited per row: sum over intervals of max(hi - lo + 1, 0)."""
    return jnp.sum(jnp.maximum(hi - lo + 1, 0), axis=-1)


def dense_causal_blocks(t, block_q, block_kv):
    """Blocks a dense causal kernel visits per row (block_q == block_kv: nb(nb+1)/2)."""
    nq = t // block_q
    return sum(min((i + 1) * block_q - 1, t - 1) // block_kv + 1 for i in range(nq))
