"""`packed_attention`: one entry point for every caller, implementations from a plain dict.

Self-attention over packed rows, a chunk of queries against a longer key row (chunked
prefill, ChunkFlow), one query per sequence against a cache (decoding): all are queries
with segment ids and positions against keys with theirs (see `reference_attention` for
the semantics). Every implementation takes the same `Segments` and returns
(out, lse); `implementation=None` tries the best for the backend and falls back to the
next on NotImplementedError. Under a mesh whose `sequence` axis is > 1 (`jax.set_mesh`),
self-attention runs as ring attention (`lcx.attention.ring`) over that axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcx.attention.pallas_gpu import gpu_implementation
from lcx.attention.pallas_tpu import tpu_implementation
from lcx.attention.reference import reference_attention
from lcx.attention.ring import ring_attention, sequence_mesh
from lcx.attention.segments import check_attention_args, segments_of, validate_segments
from lcx.attention.xla_chunked import xla_chunked_implementation


def _xla(q, k, v, segments, *, causal, window, scale, block_sizes, interpret):
    """The XLA reference: the whole Tq x Tk score matrix."""
    del block_sizes, interpret
    return reference_attention(
        q, k, v, segments.q_ids, kv_segment_ids=segments.kv_ids,
        q_positions=segments.q_positions, kv_positions=segments.kv_positions, causal=causal,
        window=window, scale=scale, return_lse=True,
    )  # fmt: skip


IMPLEMENTATIONS = {
    "xla": _xla,
    "xla_chunked": xla_chunked_implementation,
    "pallas_tpu": tpu_implementation,
    "pallas_gpu": gpu_implementation,
}

# Preference order per backend; names missing from IMPLEMENTATIONS are skipped.
PREFERENCE = {
    "tpu": ("pallas_tpu", "xla_chunked"),
    "gpu": ("pallas_gpu", "xla_chunked"),
    "cpu": ("xla_chunked",),
}
FALLBACK = "xla_chunked"


def packed_attention(
    q, k, v, segment_ids=None, *, kv_segment_ids=None, q_positions=None, kv_positions=None,
    causal=True, window=None, scale=None, return_lse=False, implementation=None,
    block_sizes=None, interpret=False, validate=False,
):  # fmt: skip
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
        q, k, v, segment_ids, kv_segment_ids=kv_segment_ids, q_positions=q_positions,
        kv_positions=kv_positions, window=window,
    )  # fmt: skip
    mesh = sequence_mesh() if kv_segment_ids is None and kv_positions is None else None
    if mesh is not None:  # self-attention of rows split over the `sequence` axis
        b, t = q.shape[:2]
        ring = ring_attention(
            q, k, v, jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids,
            jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if q_positions is None else q_positions,
            mesh=mesh, causal=causal, window=window, scale=scale,
            implementation=implementation, block_sizes=block_sizes, interpret=interpret,
            return_lse=return_lse,
        )  # fmt: skip
        return ring
    segments = segments_of(q, k, segment_ids, kv_segment_ids, q_positions, kv_positions)
    if validate:
        validate_segments(segments)
    kwargs = dict(
        causal=causal, window=window, scale=scale, block_sizes=block_sizes, interpret=interpret
    )
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is unknown; valid: {sorted(IMPLEMENTATIONS)}"
            )
        out, lse = IMPLEMENTATIONS[implementation](q, k, v, segments, **kwargs)
    else:
        out, lse = _first_that_serves(q, k, v, segments, kwargs)
    return (out, lse) if return_lse else out


def _first_that_serves(q, k, v, segments, kwargs):
    """The backend's preferred implementations in order; the fallback when none serves."""
    for name in PREFERENCE.get(jax.default_backend(), ()):
        if name in IMPLEMENTATIONS:
            try:
                return IMPLEMENTATIONS[name](q, k, v, segments, **kwargs)
            except NotImplementedError:
                continue
    return IMPLEMENTATIONS[FALLBACK](q, k, v, segments, **kwargs)
