"""Paged key/value caches for the serving engine, read raggedly.

PagedAttention (Kwon et al., "Efficient Memory Management for Large Language Model
Serving with PagedAttention", SOSP 2023, arXiv 2309.06180): one layer's keys/values live
in a pool of fixed-size pages, [num_pages, page_size, K, D]; a slot's sequence is the
pages its row of the page table names, in order, so a token at index `i` of slot `s`
(`i = position - offset[s]`, as in `lcx.cache`) sits at row `i % page_size` of page
`table[s, i // page_size]`. The engine takes pages from a free list as sequences grow and
returns them when a sequence ends, so cache memory follows the tokens in use, not
`slots * max_length`.

Reads are ragged (the work-list layout of tpu-inference's Ragged Paged Attention): a
step's queries come in groups (one decode token per slot, then blocks of
`CHUNK_QUERY_BLOCK` prompt-chunk queries of one slot each, as in `lcx.cache`), and the
host lists one work item (group, logical page) for every page a group can see, so a
step reads each slot's own pages up to its own length (inside its attention window),
never up to the longest slot. Each item's scores are computed on its page alone and the
items of a group are combined by a segment-wise log-sum-exp (the online softmax of
FlashAttention, arXiv 2205.14135, over an unordered list). Item lists are padded to a
power of two (padding items name the group past the last, whose results are dropped), so
a step compiles once per bucket.

`lcx.attention.ragged_paged_xla` is the XLA path (every backend, and the reference). On
TPU and GPU the same work list runs as one Pallas kernel (`lcx.attention.ragged_paged_tpu`,
`_gpu`) that reads each item's page straight from the pool. None of them is
`jax.experimental.pallas.ops.tpu.ragged_paged_attention`: that kernel returns no
log-sum-exp, which the engine needs to merge shared prefixes (Hydragen) into the same
queries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcx.attention.ragged_paged_gpu import ragged_paged_attention_gpu
from lcx.attention.ragged_paged_tpu import ragged_paged_attention_tpu
from lcx.attention.ragged_paged_xla import ragged_paged_attention_xla
from lcx.cache import CHUNK_QUERY_BLOCK, AttentionCache, check_decode_rows

MIN_ITEMS = 8  # the smallest work-list bucket


class PageLayout(NamedTuple):
    """Where one step's tokens live and what its queries read.

    `table_SxP`: each slot's physical pages, in order ([slots, pages per slot]).
    `decode_group_W`, `decode_page_W`: the decode queries' work items (the slot, a logical
    page of it); `chunk_group_W`, `chunk_page_W`: the chunk blocks' (the block's index,
    a logical page of its slot). A group index past the last group marks padding. The
    item lists are None for a step that only writes (prepacked prefill).
    """

    table_SxP: jax.Array
    decode_group_W: jax.Array | None = None
    decode_page_W: jax.Array | None = None
    chunk_group_W: jax.Array | None = None
    chunk_page_W: jax.Array | None = None


class PagedAttentionCache(NamedTuple):
    """Keys and values of one attention layer: [num_pages, page_size, K, D] each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_pages, page_size, kv_heads, head_dim, dtype) -> PagedAttentionCache:
        return cls(*AttentionCache.zeros(num_pages, page_size, kv_heads, head_dim, dtype))

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    def write(
        self,
        k_BxTxKxD,
        v_BxTxKxD,
        segment_ids_BxT,
        positions_BxT,
        offset_S=None,
        *,
        pages: PageLayout,
    ):
        """The cache with every real token's keys/values stored in its slot's page."""
        table = pages.table_SxP
        slots, per_slot = table.shape
        n, size = self.num_pages, self.page_size
        real = segment_ids_BxT > 0
        slot = jnp.clip(segment_ids_BxT - 1, 0, slots - 1)
        index = positions_BxT - (0 if offset_S is None else offset_S[slot])
        real &= (index >= 0) & (index < per_slot * size)
        page = table[slot, jnp.clip(index // size, 0, per_slot - 1)]
        flat = jnp.where(real, page * size + index % size, n * size)  # out of range: dropped

        def put(cache, x):
            """x's tokens written at their flat (page, row) places."""
            rows = cache.reshape(n * size, *cache.shape[2:])
            rows = rows.at[flat].set(x.astype(cache.dtype), mode="drop")
            return rows.reshape(cache.shape)

        return PagedAttentionCache(put(self.k, k_BxTxKxD), put(self.v, v_BxTxKxD))


def paged_cache_attention(
    q,
    segment_ids,
    positions,
    cache,
    pages,
    *,
    offset_S=None,
    window=None,
    decode_rows=None,
    implementation=None,
    interpret=False,
):
    """(out, lse) of one engine row [1, T, H, D] against a paged cache, causal.

    The row's first `decode_rows` queries (default: one per slot) are C = decode_rows /
    slots per slot (a decode token, or one and its drafts; or padding), the rest blocks
    of `CHUNK_QUERY_BLOCK` queries of one slot each (`lcx.cache.cache_attention`'s
    layout); each group reads only the pages its work items name. `implementation`: a key
    of RAGGED_IMPLEMENTATIONS, or None for the backend's Pallas kernel on TPU and GPU (XLA
    where it cannot serve the call) and XLA elsewhere; `interpret` runs a kernel in
    Pallas' interpreter.
    """
    ragged = _ragged_implementation(implementation, interpret)
    s = pages.table_SxP.shape[0]
    d = s if decode_rows is None else decode_rows
    if q.shape[0] != 1:
        raise ValueError(f"a paged step takes one row of queries; got {q.shape[0]}")
    check_decode_rows(d, s, q.shape[1])
    offset_S = jnp.zeros((s,), jnp.int32) if offset_S is None else offset_S
    common = dict(cache=cache, table=pages.table_SxP, offset_S=offset_S, window=window)
    by_slot = lambda x: x[0, :d].reshape(s, d // s, *x.shape[2:])  # noqa: E731
    parts = [
        ragged(
            by_slot(q),
            by_slot(segment_ids) == jnp.arange(1, s + 1)[:, None],
            by_slot(positions),
            jnp.arange(s),
            pages.decode_group_W,
            pages.decode_page_W,
            **common,
        )
    ]
    if q.shape[1] > d:
        blocks = lambda x: x[0, d:].reshape(-1, CHUNK_QUERY_BLOCK, *x.shape[2:])  # noqa: E731
        ids_NxC = blocks(segment_ids)
        slot_plus_one = ids_NxC.max(axis=1)
        own = (ids_NxC == slot_plus_one[:, None]) & (ids_NxC > 0)
        slot_N = jnp.maximum(slot_plus_one - 1, 0)
        parts.append(
            ragged(
                blocks(q),
                own,
                blocks(positions),
                slot_N,
                pages.chunk_group_W,
                pages.chunk_page_W,
                **common,
            )
        )
    return tuple(jnp.concatenate(p, axis=0)[None] for p in zip(*parts, strict=True))


def _ragged_implementation(implementation, interpret):
    """The ragged read `implementation` names (None: the backend's preferred ones, each
    falling back to the next on NotImplementedError), as one function."""
    if implementation is not None and implementation not in RAGGED_IMPLEMENTATIONS:
        raise ValueError(
            f"paged_cache_attention: implementation={implementation!r} is unknown; valid: "
            f"None, {', '.join(map(repr, RAGGED_IMPLEMENTATIONS))}"
        )
    if implementation is not None:
        names = [implementation]
    else:
        names = [*_PREFERENCE.get(jax.default_backend(), []), "xla"]

    def ragged(*args, **kwargs):
        """The first of `names` that serves the call."""
        for name in names[:-1]:
            try:
                return RAGGED_IMPLEMENTATIONS[name](*args, **kwargs, interpret=interpret)
            except NotImplementedError:
                continue
        return RAGGED_IMPLEMENTATIONS[names[-1]](*args, **kwargs, interpret=interpret)

    return ragged


# Each takes `ragged_paged_attention_xla`'s arguments.
RAGGED_IMPLEMENTATIONS = {
    "xla": ragged_paged_attention_xla,
    "pallas_tpu": ragged_paged_attention_tpu,
    "pallas_gpu": ragged_paged_attention_gpu,
}
_PREFERENCE = {"tpu": ["pallas_tpu"], "gpu": ["pallas_gpu"]}  # then "xla"


def ragged_work(
    segment_ids_T, positions_T, slots, offset_S, page_size, window=None, decode_rows=None
):
    """The work items of one engine row (host side): a PageLayout's four item lists,
    each padded to a power of two (at least MIN_ITEMS), and the real items' counts
    (decode, chunks): the pages the step reads.

    Group `s` (decode: the row's first `decode_rows`, default `slots`, queries, C per
    slot) reads slot s's pages up to its last token's index; chunk block `b` reads its
    slot's pages up to its last token's index; with a window, from the first page any of
    its queries can see.
    """
    segment_ids_T, positions_T = np.asarray(segment_ids_T), np.asarray(positions_T)
    offset_S = np.asarray(offset_S)

    def pages_of(slot, indices):
        """The logical pages a query group at these indices of `slot` can see."""
        first = 0 if window is None else max(0, int(indices.min()) - window + 1) // page_size
        return range(first, int(indices.max()) // page_size + 1)

    d = slots if decode_rows is None else decode_rows
    c = d // slots
    decode = []
    for s in range(slots):
        at = s * c + np.flatnonzero(segment_ids_T[s * c : (s + 1) * c] == s + 1)
        if at.size:
            decode += [(s, page) for page in pages_of(s, positions_T[at] - offset_S[s])]
    chunk = []
    blocks = (len(segment_ids_T) - d) // CHUNK_QUERY_BLOCK
    for b in range(blocks):
        ids = segment_ids_T[d + b * CHUNK_QUERY_BLOCK : d + (b + 1) * CHUNK_QUERY_BLOCK]
        if ids.max() > 0:
            slot = int(ids.max()) - 1
            at = d + b * CHUNK_QUERY_BLOCK + np.flatnonzero(ids == slot + 1)
            chunk += [(b, page) for page in pages_of(slot, positions_T[at] - offset_S[slot])]
    lists = []
    for items, groups in ((decode, slots), (chunk, blocks)):
        width = max(MIN_ITEMS, 1 << max(len(items) - 1, 0).bit_length())
        group = np.full(width, groups, np.int32)
        page = np.zeros(width, np.int32)
        if items:
            group[: len(items)], page[: len(items)] = np.asarray(items, np.int32).T
        lists += [group, page]
    return lists, (len(decode), len(chunk))
