"""Segment ids <-> cumulative sequence lengths, the "THD" / varlen form of other kernels.

FlashAttention's varlen kernels (`cu_seqlens`), cuDNN's ragged offsets and
TransformerEngine's THD layout describe packed documents by cumulative lengths:
document i occupies tokens [cu_seqlens[i], cu_seqlens[i + 1]) of the flattened batch.
lcx describes the same thing with per-token segment ids. Both converters are O(T) and
jit-compatible (static output sizes, padded with the total length).
"""

from __future__ import annotations

import jax.numpy as jnp


def segment_ids_to_cu_seqlens(segment_ids_BxT, *, max_segments: int):
    """(cu_seqlens int32 [max_segments + 1], num_segments) of the flattened batch.

    Documents are the runs of one non-zero id, row by row (a run never crosses rows);
    padding tokens (id 0) are dropped, as the varlen kernels take only real tokens.
    Entries past `num_segments` repeat the total number of real tokens. More documents
    than `max_segments` are not representable: the count returned says how many there
    were, so a caller can check it.
    """
    seg = jnp.asarray(segment_ids_BxT, jnp.int32)
    if seg.ndim != 2:
        raise ValueError(f"segment_ids must be [B, T]; got shape {seg.shape}")
    if max_segments <= 0:
        raise ValueError(f"max_segments={max_segments} must be positive")
    prev = jnp.concatenate([jnp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
    starts = ((seg != prev) & (seg != 0)).reshape(-1)
    real = (seg != 0).reshape(-1).astype(jnp.int32)
    tokens_before = jnp.cumsum(real) - real  # real tokens before each position
    doc_index = jnp.cumsum(starts.astype(jnp.int32)) - 1
    total = jnp.sum(real)
    slot = jnp.where(starts, doc_index, max_segments + 1)  # out of range: dropped
    cu = jnp.full((max_segments + 1,), total, jnp.int32)
    cu = cu.at[slot].set(tokens_before, mode="drop")
    return cu, jnp.sum(starts.astype(jnp.int32))


def cu_seqlens_to_segment_ids(cu_seqlens, total_tokens: int):
    """Segment ids int32 [1, total_tokens] of documents [cu[i], cu[i+1]): id 1 + i.

    Tokens at or after cu_seqlens[-1] are padding (0); repeated trailing entries (empty
    documents) are allowed, as in the padded output of `segment_ids_to_cu_seqlens`.
    """
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries; got {cu.shape}")
    # 1 + document index = how many document starts lie at or before the token.
    starts = jnp.zeros((total_tokens,), jnp.int32).at[cu[:-1]].add(1, mode="drop")
    doc = jnp.cumsum(starts)
    return jnp.where(jnp.arange(total_tokens) < cu[-1], doc, 0)[None]
