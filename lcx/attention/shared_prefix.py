"""Attention over prefixes shared by many sequences, each stored once (Hydragen).

Juravsky et al., "Hydragen: High-Throughput LLM Inference with Shared Prefixes" (2024,
arXiv 2402.05099): attention over `[prefix; suffix]` is the log-sum-exp merge of
attention over the prefix and attention over the suffix. The prefix part of every
query of the batch is one `packed_attention` call: all queries in one row against the
single copy of the prefix keys, so the prefix is read once per step instead of once per
sequence. Prefixes form a tree: each level is a `SharedPrefix` of G prefixes (one group
per prefix), every query naming its group at each level, and the levels merge like the
suffix does (a system prompt shared by all, then a few-shot block shared by some).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcx.attention.api import packed_attention
from lcx.attention.merge import merge_attention


class SharedPrefix(NamedTuple):
    """G prefixes of one tree level, stored once: keys/values [G, P, K, D].

    `lengths` [G]: entries of the P each prefix fills; `starts` [G]: the position of
    each prefix's first token (0 at the root, the parent's end below it).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    starts: jax.Array

    def as_row(self):
        """(k, v [1, G*P, K, D], segment ids [1, G*P] = group + 1 or 0, positions)."""
        g, p = self.k.shape[:2]
        index = jnp.arange(p, dtype=jnp.int32)
        filled = index[None, :] < self.lengths[:, None]
        ids = jnp.where(filled, jnp.arange(1, g + 1, dtype=jnp.int32)[:, None], 0)
        positions = index[None, :] + self.starts[:, None].astype(jnp.int32)
        flat = lambda x: x.reshape(1, g * p, *x.shape[2:])  # noqa: E731
        return flat(self.k), flat(self.v), ids.reshape(1, -1), positions.reshape(1, -1)


def prefix_attention(
    q,
    prefix: SharedPrefix,
    groups,
    q_positions,
    *,
    causal=True,
    window=None,
    scale=None,
    implementation=None,
    block_sizes=None,
    interpret=False,
):
    """(out [B, Tq, Hq, D], lse [B, Tq, Hq]) of every query over its group's prefix.

    `groups` int [B, Tq]: each query's prefix (-1: none, out 0 and lse -inf). All B*Tq
    queries go in one row against the one copy of the prefixes.
    """
    b, t, h, d = q.shape
    k, v, kv_ids, kv_positions = prefix.as_row()
    q_ids = jnp.where(groups >= 0, groups + 1, 0).astype(jnp.int32).reshape(1, b * t)
    out, lse = packed_attention(
        q.reshape(1, b * t, h, d),
        k,
        v,
        q_ids,
        kv_segment_ids=kv_ids,
        q_positions=q_positions.reshape(1, b * t),
        kv_positions=kv_positions,
        causal=causal,
        window=window,
        scale=scale,
        return_lse=True,
        implementation=implementation,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    return out.reshape(b, t, h, d), lse.reshape(b, t, h)


def shared_prefix_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    prefixes,
    prefix_groups,
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
):
    """`packed_attention` of q over its own keys k, v and over its shared prefixes, merged.

    Args:
      q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions: as in
        `packed_attention`, for each sequence's own (suffix) keys. Positions should count
        from the start of the root prefix, so RoPE and causality see one sequence.
      prefixes: a list of `SharedPrefix`, one per tree level.
      prefix_groups: a list of int [B, Tq], each query's group at that level (-1: none).

    Returns:
      As `packed_attention`: equal to attention over the concatenation of each query's
      prefixes and its own keys.
    """
    if len(prefixes) != len(prefix_groups):
        raise ValueError(
            f"prefixes has {len(prefixes)} levels but prefix_groups {len(prefix_groups)}; "
            "give one [B, Tq] group array per level"
        )
    b, t = q.shape[:2]
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    common = dict(
        causal=causal,
        window=window,
        scale=scale,
        implementation=implementation,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    parts = [
        packed_attention(
            q,
            k,
            v,
            segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_positions=q_positions,
            kv_positions=kv_positions,
            return_lse=True,
            **common,
        )
    ]
    for prefix, groups in zip(prefixes, prefix_groups, strict=True):
        if segment_ids is not None:
            groups = jnp.where(segment_ids > 0, groups, -1)  # padding sees no prefix
        parts.append(prefix_attention(q, prefix, groups, q_positions, **common))
    out, lse = merge_attention(parts)
    return (out, lse) if return_lse else out
