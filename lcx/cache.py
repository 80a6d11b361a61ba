"""Per-sequence key/value caches of the attention layers (the pattern of flax's gemma example).

A cache holds one slot per sequence, [slots, length, K, D]. A token with segment id
`s > 0` belongs to slot `s - 1` and its keys/values live at `position - offset[slot]`
of that slot (`offset`: the length of the shared prefixes the slot continues, stored
once elsewhere, see `lcx.attention.SharedPrefix`; none: 0); padding
(segment id 0) writes nothing. Queries attend the whole cache as one packed row of
`slots * length` keys whose segment ids are the slot ids and whose positions are the
index in the slot plus `offset`, so `packed_attention` masks other sequences and, through
causality, the stale entries a slot's previous sequence left beyond the current one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcx.attention import BlockSizes, packed_attention

# Prompt chunks of an engine step against the whole cache: a query block spanning the
# chunks of two slots visits every slot between them, so query blocks stay short.
CHUNK_BLOCK_SIZES = BlockSizes(block_q=32, block_kv=128)


class AttentionCache(NamedTuple):
    """Keys and values of one attention layer: [slots, length, K, D] each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, slots, length, kv_heads, head_dim, dtype) -> AttentionCache:
        shape = (slots, length, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[0]

    @property
    def length(self) -> int:
        return self.k.shape[1]

    def write(self, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, positions_BxT, offset_S=None):
        """The cache with every real token's keys/values stored at (slot, position - offset)."""
        slot = jnp.where(segment_ids_BxT > 0, segment_ids_BxT - 1, self.slots)  # out: dropped
        index = positions_BxT
        if offset_S is not None:
            index = index - offset_S[jnp.minimum(slot, self.slots - 1)]
        index = jnp.where((index >= 0) & (index < self.length), index, self.length)
        put = lambda cache, x: cache.at[slot, index].set(x.astype(cache.dtype), mode="drop")  # noqa: E731
        return AttentionCache(put(self.k, k_BxTxKxD), put(self.v, v_BxTxKxD))

    def as_row(self, offset_S=None):
        """(k, v [1, S*L, K, D], segment ids [1, S*L] = slot + 1, positions [1, S*L])."""
        s, n = self.slots, self.length
        ids = jnp.repeat(jnp.arange(1, s + 1, dtype=jnp.int32), n)[None]
        positions_SxL = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (s, n))
        if offset_S is not None:
            positions_SxL = positions_SxL + offset_S[:, None]
        positions = positions_SxL.reshape(1, s * n)
        flat = lambda x: x.reshape(1, s * n, *x.shape[2:])  # noqa: E731
        return flat(self.k), flat(self.v), ids, positions


def cache_attention(q, segment_ids, positions, cache: AttentionCache, *, offset_S=None,
                 decode_rows=0, window=None, implementation=None):  # fmt: skip
    """(out, lse) of one row of queries [1, T, H, D] against the whole cache, causal.

    `decode_rows`: the row's first `slots` queries are one decode token per slot (query i
    of slot i, or padding) and attend their own slot as a batch of [S, 1] queries
    against [S, L] keys; the rest (prompt chunks) attend the cache as one row.
    """
    if q.shape[0] != 1:
        raise ValueError(f"attending the cache takes one row of queries, got {q.shape[0]}")
    common = dict(causal=True, window=window, implementation=implementation, return_lse=True)
    k_row, v_row, ids, kv_positions = cache.as_row(offset_S)
    if not decode_rows:
        return packed_attention(
            q, k_row, v_row, segment_ids, kv_segment_ids=ids, q_positions=positions,
            kv_positions=kv_positions, **common,
        )  # fmt: skip
    s, n = cache.slots, cache.length
    if decode_rows != s:
        raise ValueError(f"decode_rows={decode_rows} must equal the cache's {s} slots")
    if q.shape[1] < s:
        raise ValueError(f"decode_rows={s} needs a row of at least {s} queries")
    decode = packed_attention(
        q[0, :s, None], cache.k, cache.v, (segment_ids[0, :s] > 0).astype(jnp.int32)[:, None],
        kv_segment_ids=jnp.ones((s, n), jnp.int32), q_positions=positions[0, :s, None],
        kv_positions=kv_positions.reshape(s, n), **common,
    )  # fmt: skip
    decode = tuple(x.reshape(1, s, *x.shape[2:]) for x in decode)
    if q.shape[1] == s:
        return decode

    def attend_chunks():
        """Prompt chunks against the cache as one row."""
        return packed_attention(
            q[:, s:], k_row, v_row, segment_ids[:, s:], kv_segment_ids=ids,
            q_positions=positions[:, s:], kv_positions=kv_positions,
            block_sizes=CHUNK_BLOCK_SIZES, **common,
        )  # fmt: skip

    def no_chunks():
        """A decode-only step: nothing to attend."""
        out = jnp.zeros_like(q[:, s:])
        return out, jnp.full(out.shape[:3], -jnp.inf, jnp.float32)

    chunks = jax.lax.cond(jnp.any(segment_ids[:, s:] > 0), attend_chunks, no_chunks)
    return tuple(jnp.concatenate([d, c], axis=1) for d, c in zip(decode, chunks, strict=True))
