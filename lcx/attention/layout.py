"""Block schedules for packed attention: which key blocks each query block must visit.

With every document one contiguous run of a segment id, query t sees the keys
[lo_t, hi_t]: lo_t = its run's start (or t - window + 1 if later), hi_t = t when causal
(else the run's end, or t + window - 1 if earlier). Run starts and ends are cumulative
max / min scans: O(T) per row, no T x T mask anywhere. For q block i the union of its
queries' intervals is one interval [lo, hi] of keys, hence of kv blocks; the dkv pass
needs the transpose, per kv block the interval of q blocks whose queries see it. A
block pair is "full" (no element mask needed) when every query of the block sees every
key of the other: same document, below the diagonal, inside the window.

Work counted in blocks (PAPERS.md, "Packed / document-masked attention"): dense causal
visits nb(nb+1)/2 blocks per row, this schedule sum_i (hi_i - lo_i + 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_BIG = 2**30


class BlockSchedule(NamedTuple):
    """Inclusive block intervals per row; hi < lo means the block visits nothing.

    kv_lo, kv_hi, kv_full_lo, kv_full_hi: int32 [B, T / block_q], kv blocks per q block.
    q_lo, q_hi, q_full_lo, q_full_hi: int32 [B, T / block_kv], q blocks per kv block.
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


def visible_key_range(segment_ids_BxT, *, causal=True, window=None):
    """[lo_t, hi_t] of keys query t sees; padding queries get an empty range."""
    seg = jnp.asarray(segment_ids_BxT)
    start, end = run_bounds(seg)
    idx = jnp.arange(seg.shape[1], dtype=jnp.int32)[None]
    lo, hi = start, (idx if causal else end)
    if window is not None:
        lo = jnp.maximum(lo, idx - window + 1)
        hi = jnp.minimum(hi, idx + window - 1)
    pad = seg == 0
    return jnp.where(pad, _BIG, lo), jnp.where(pad, -1, hi)


def visible_query_range(segment_ids_BxT, *, causal=True, window=None):
    """[lo_s, hi_s] of queries that see key s; padding keys get an empty range."""
    seg = jnp.asarray(segment_ids_BxT)
    start, end = run_bounds(seg)
    idx = jnp.arange(seg.shape[1], dtype=jnp.int32)[None]
    lo, hi = (idx if causal else start), end
    if window is not None:
        lo = jnp.maximum(lo, idx - window + 1)
        hi = jnp.minimum(hi, idx + window - 1)
    pad = seg == 0
    return jnp.where(pad, _BIG, lo), jnp.where(pad, -1, hi)


def _intervals(lo_t, hi_t, seg, block, other_block):
    """Block intervals of the union of per-token ranges, and of the full sub-range."""
    b, t = seg.shape
    shape = (b, t // block, block)
    lo, hi = lo_t.reshape(shape), hi_t.reshape(shape)
    union_lo, union_hi = lo.min(-1), hi.max(-1)
    empty = union_hi < 0
    first = jnp.where(empty, 0, union_lo // other_block)
    last = jnp.where(empty, -1, union_hi // other_block)
    # Full: one document, no padding, and the other block inside every token's range.
    run = seg.reshape(shape)
    uniform = jnp.all(run == run[..., :1], axis=-1) & (run[..., 0] != 0)
    common_lo, common_hi = lo.max(-1), hi.min(-1)
    full_first = -(-common_lo // other_block)
    full_last = (common_hi + 1) // other_block - 1
    full_empty = ~uniform | (full_last < full_first)
    full_first = jnp.where(full_empty, 0, full_first)
    full_last = jnp.where(full_empty, -1, full_last)
    return tuple(x.astype(jnp.int32) for x in (first, last, full_first, full_last))


def block_schedule(segment_ids, *, block_q, block_kv, causal=True, window=None):
    """Per row and q block the inclusive kv-block range to visit, and the transpose.

    Args:
      segment_ids: int [B, T], T a multiple of block_q and block_kv; 0 is padding.
      block_q, block_kv: block sizes of the kernels.
      causal, window: the attention mask (DESIGN.md semantics).

    Returns:
      A BlockSchedule of int32 arrays.
    """
    seg = jnp.asarray(segment_ids, jnp.int32)
    t = seg.shape[-1]
    if seg.ndim != 2 or t % block_q or t % block_kv:
        raise ValueError(
            f"segment_ids must be [B, T] with T a multiple of {block_q=} and {block_kv=}; "
            f"got {seg.shape}"
        )
    key_lo, key_hi = visible_key_range(seg, causal=causal, window=window)
    query_lo, query_hi = visible_query_range(seg, causal=causal, window=window)
    kv = _intervals(key_lo, key_hi, seg, block_q, block_kv)
    q = _intervals(query_lo, query_hi, seg, block_kv, block_q)
    return BlockSchedule(*kv, *q)


def count_visited(lo, hi):
    """Blocks visited per row: sum over intervals of max(hi - lo + 1, 0)."""
    return jnp.sum(jnp.maximum(hi - lo + 1, 0), axis=-1)


def dense_causal_blocks(t, block_q, block_kv):
    """Blocks a dense causal kernel visits per row (block_q == block_kv: nb(nb+1)/2)."""
    nq = t // block_q
    return sum(min((i + 1) * block_q - 1, t - 1) // block_kv + 1 for i in range(nq))
