"""`packed_attention`: one entry point for every caller, implementations from a plain dict.

Self-attention over packed rows, a chunk of queries against a longer key row (chunked
prefill, ChunkFlow), one query per sequence against a cache (decoding): all are queries
with segment ids and positions against keys with theirs (see `reference_attention` for
the semantics). Every implementation takes the same `Segments` and returns
(out, lse); `implementation=None` tries the best for the backend and falls back to the
next on NotImplementedError (`lcx.attention.dispatch`, whose `IMPLEMENTATIONS` and
`PREFERENCE` are these). Under a mesh whose `sequence` axis is > 1 (`jax.set_mesh`),
self-attention runs as ring attention (`lcx.attention.ring`) over that axis.
"""

from __future__ import annotations

import jax.numpy as jnp

from lcx.attention.dispatch import FALLBACK, IMPLEMENTATIONS, PREFERENCE, attend_segments
from lcx.attention.ring import ring_attention, sequence_mesh
from lcx.attention.segments import check_attention_args, segments_of, validate_segments

__all__ = ["FALLBACK", "IMPLEMENTATIONS", "PREFERENCE", "packed_attention"]


def packed_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    causal=True,
    window=None,
    scale=None,
    return_lse=False,
    implementation=None,
    block_sizes=None,
    interpret=False,
    validate=False,
):
    """Attention within documents of packed rows, [B, T, H, D] layout.

    Query t sees key s iff `segment_ids[t] == kv_segment_ids[s] != 0`, when causal
    `kv_positions[s] <= q_positions[t]`, and with a window
    `|q_positions[t] - kv_positions[s]| < window`. On each side every segment is one
    contiguous run whose positions do not decrease along the row.

    Args:
      q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq % Hkv == 0.
      segment_ids: int [B, Tq], 0 = padding; None: one document per row.
      kv_segment_ids: int [B, Tk]; default `segment_ids` (self-attention, Tq == Tk).
      q_positions, kv_positions: int [B, Tq] / [B, Tk]; default the index in the row.
      causal, window, scale: masking and logit scale (default 1/sqrt(D)).
      return_lse: also return lse [B, Tq, Hq] float32, the natural log-sum-exp of the
        scaled logits over the visible keys (-inf where none): parts over disjoint keys
        combine exactly with `merge_attention`.
      implementation: a key of IMPLEMENTATIONS, or None for the best on this backend.
      block_sizes: a `BlockSizes` for the blocked implementations.
      interpret: run Pallas kernels in interpret mode (CPU tests).
      validate: check on the host that segments are contiguous runs and positions do
        not decrease inside them (needs concrete arrays, so not under jit; not free).

    Returns:
      [B, Tq, Hq, D], exactly 0 for queries that see no key; with `return_lse`,
      (out, lse).
    """
    check_attention_args(
        q,
        k,
        v,
        segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        window=window,
    )
    mesh = sequence_mesh() if kv_segment_ids is None and kv_positions is None else None
    if mesh is not None:  # self-attention of rows split over the `sequence` axis
        b, t = q.shape[:2]
        ring = ring_attention(
            q,
            k,
            v,
            jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids,
            jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if q_positions is None
            else q_positions,
            mesh=mesh,
            causal=causal,
            window=window,
            scale=scale,
            implementation=implementation,
            block_sizes=block_sizes,
            interpret=interpret,
            return_lse=return_lse,
        )
        return ring
    segments = segments_of(q, k, segment_ids, kv_segment_ids, q_positions, kv_positions)
    if validate:
        validate_segments(segments)
    out, lse = attend_segments(
        q,
        k,
        v,
        segments,
        implementation=implementation,
        causal=causal,
        window=window,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    return (out, lse) if return_lse else out
