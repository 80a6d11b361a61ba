"""Per-sequence key/value caches of the attention layers (the pattern of flax's gemma example).

A cache holds one slot per sequence, [slots, length, K, D]. A token with segment id
`s > 0` belongs to slot `s - 1` and its keys/values live at `position - offset[slot]`
of that slot (`offset`: the length of the shared prefixes the slot continues, stored
once elsewhere, see `lcx.attention.SharedPrefix`; none: 0); padding
(segment id 0) writes nothing. Queries attend the whole cache as one packed row of
`slots * length` keys whose segment ids are the slot ids and whose positions are the
index in the slot plus `offset`, so `packed_attention` masks other sequences and, through
causality, the stale entries a slot's previous sequence left beyond the current one.

An engine row (`decode_rows`) attends slot by slot instead. On the CPU, with no
implementation named, each query group reads its slot raggedly, in pages of its rows
(`lcx.attention.ragged_paged_xla`, the paged cache's read, with a work list built on the
device), so a group reads only up to its own last token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcx.attention import packed_attention
from lcx.attention.ragged_paged_xla import ragged_stretch_attention_xla, work_in_graph

# An engine row's prompt chunks come in blocks of this many queries, each block holding one
# slot's tokens (or padding): a block attends only its own slot's cache, gathered, so a
# step's attention work follows its chunks (the ragged layout of tpu-inference's ragged
# paged attention) instead of the whole flattened cache.
CHUNK_QUERY_BLOCK = 16
# Rows of a slot's cache per work item when the CPU reads it raggedly (`_ragged_slot_read`).
RAGGED_PAGE = 16
# Up to this many elements of k (4 MiB in float32) the CPU's decode queries take the dense
# product over the whole cache instead: n-gram verify steps on 8 slots of about 200 entries
# (2 kv heads of 64) ran 1.66x plain decoding that way, 1.45-1.51x read raggedly.
DENSE_DECODE_CACHE = 1 << 20


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


def cache_attention(
    q,
    segment_ids,
    positions,
    cache: AttentionCache,
    *,
    offset_S=None,
    decode_rows=0,
    window=None,
    implementation=None,
):
    """(out, lse) of one row of queries [1, T, H, D] against the cache, causal.

    Without `decode_rows` the queries attend the whole cache as one packed row.

    `decode_rows`: the row's first `decode_rows` queries, C = decode_rows / slots per
    slot (queries i*C .. i*C + C - 1 are slot i's or padding: a decode token, or one and
    the drafts verified after it), attend their own slot as a batch of [S, C] queries
    against [S, L] keys; the rest (prompt chunks) come in blocks of `CHUNK_QUERY_BLOCK`
    queries, each block one slot's tokens or padding, and a block attends its slot's
    cache alone (a query of another slot in a block attends nothing).
    """
    if q.shape[0] != 1:
        raise ValueError(f"attending the cache takes one row of queries, got {q.shape[0]}")
    common = dict(causal=True, window=window, implementation=implementation, return_lse=True)
    if not decode_rows:
        k_row, v_row, ids, kv_positions = cache.as_row(offset_S)
        return packed_attention(
            q,
            k_row,
            v_row,
            segment_ids,
            kv_segment_ids=ids,
            q_positions=positions,
            kv_positions=kv_positions,
            **common,
        )
    s, d = cache.slots, decode_rows
    check_decode_rows(d, s, q.shape[1])
    offset_S = jnp.zeros((s,), jnp.int32) if offset_S is None else offset_S
    groups = [
        (  # the decode group reads the cache as it is (slot None), the blocks their slots
            q[0, at].reshape(*real.shape, *q.shape[2:]),
            real,
            positions[0, at].reshape(real.shape),
            None if at.start == 0 else slot,
        )
        for real, _, slot, at in query_groups(segment_ids[0], positions[0], offset_S, s, d)
    ]
    if implementation is None and jax.default_backend() == "cpu":
        # Each group reads its own slot up to its own last token, a block of pages at a
        # time: the dense products over the whole [S, L, K, D] cache had XLA copy it into
        # [S, K, L, D] in every layer at every step, and the chunked attention padded it
        # to whole kv tiles (BENCHMARKS.md, "One stretch per slot reads raggedly too").
        # A small cache's decodes keep the dense product: its copy costs less than the
        # loop's steps.
        dense = cache.k.size <= DENSE_DECODE_CACHE
        parts = [
            _slot_attention(*group, cache, offset_S, {**common, "implementation": "xla"})
            if dense and group is groups[0]
            else _ragged_slot_read(*group, cache, offset_S, window)
            for group in groups
        ]
    else:
        parts = [_slot_attention(*group, cache, offset_S, common) for group in groups]
    return tuple(jnp.concatenate(p, axis=0)[None] for p in zip(*parts, strict=True))


def query_groups(segment_ids_T, positions_T, offset_S, slots, decode_rows, xp=jnp):
    """The row's query groups, decode part then chunk part (the chunk part only where the
    row has chunk blocks), each (real_GxC, index_GxC, slot_G, the row's slice): the first
    `decode_rows` queries, decode_rows / slots per slot, and blocks of
    `CHUNK_QUERY_BLOCK` queries of one slot each; `xp` numpy (host) or jax.numpy."""
    d, width = decode_rows, segment_ids_T.shape[0]
    ids_SxC = segment_ids_T[:d].reshape(slots, d // slots)
    slot_S = xp.arange(slots)
    real_SxC = ids_SxC == (slot_S + 1)[:, None]
    index_SxC = positions_T[:d].reshape(ids_SxC.shape) - offset_S[:, None]
    parts = [(real_SxC, index_SxC, slot_S, slice(0, d))]
    if width > d:
        ids_NxC = segment_ids_T[d:].reshape(-1, CHUNK_QUERY_BLOCK)
        slot_plus_one = ids_NxC.max(axis=1)
        real_NxC = (ids_NxC == slot_plus_one[:, None]) & (ids_NxC > 0)
        slot_N = xp.maximum(slot_plus_one - 1, 0)
        index_NxC = positions_T[d:].reshape(ids_NxC.shape) - offset_S[slot_N][:, None]
        parts.append((real_NxC, index_NxC, slot_N, slice(d, width)))
    return parts


def check_decode_rows(decode_rows: int, slots: int, width: int):
    """ValueError unless a row of `width` queries can start with `decode_rows` queries of
    `slots` slots, the same number each, and go on in whole chunk blocks."""
    if decode_rows < slots or decode_rows % slots:
        raise ValueError(f"decode_rows={decode_rows} must be a multiple of the {slots} slots")
    if width < decode_rows or (width - decode_rows) % CHUNK_QUERY_BLOCK:
        raise ValueError(
            f"decode_rows={decode_rows} needs a row of {decode_rows} decode queries plus a "
            f"multiple of CHUNK_QUERY_BLOCK={CHUNK_QUERY_BLOCK} chunk queries; got {width}"
        )


def _slot_attention(q_NxCxHxD, real_NxC, positions_NxC, slot_N, cache, offset_S, common):
    """(out, lse) flattened to [N * C, ...]: query group n against slot slot_N[n]'s cache.

    `slot_N` None: group n is slot n (every slot, no gather).
    """
    n, c = real_NxC.shape
    length = cache.length
    k, v = (cache.k, cache.v) if slot_N is None else (cache.k[slot_N], cache.v[slot_N])
    offset_N = offset_S if slot_N is None else offset_S[slot_N]
    kv_positions = jnp.arange(length, dtype=jnp.int32)[None] + offset_N[:, None]
    out, lse = packed_attention(
        q_NxCxHxD,
        k,
        v,
        real_NxC.astype(jnp.int32),
        kv_segment_ids=jnp.ones((n, length), jnp.int32),
        q_positions=positions_NxC,
        kv_positions=kv_positions,
        **common,
    )
    return out.reshape(n * c, *out.shape[2:]), lse.reshape(n * c, *lse.shape[2:])


def ragged_page(length: int) -> int:
    """Rows per page when the CPU reads a cache of `length` entries per slot raggedly."""
    return min(RAGGED_PAGE, length)


def _ragged_slot_read(q_NxCxHxD, real_NxC, positions_NxC, slot_N, cache, offset_S, window):
    """`_slot_attention` as a ragged read: each group's own slot in pages of its rows up
    to its last token (`work_in_graph`), so no group reads past its slot's length."""
    page = ragged_page(cache.length)
    slot_N = jnp.arange(cache.slots) if slot_N is None else slot_N
    index_NxC = positions_NxC - offset_S[slot_N][:, None]
    pages_per_slot = -(-cache.length // page)
    group_W, page_W = work_in_graph(real_NxC, index_NxC, page, pages_per_slot, window)
    return ragged_stretch_attention_xla(
        q_NxCxHxD,
        real_NxC,
        positions_NxC,
        slot_N,
        group_W,
        page_W,
        k=cache.k,
        v=cache.v,
        page_size=page,
        offset_S=offset_S,
        window=window,
    )
