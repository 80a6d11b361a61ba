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
`CHUNK_QUERY_BLOCK` prompt-chunk queries of one slot each, as in `lcx.cache`), and a
work list names one item (group, logical page) for every page a group can see, so a step
reads each slot's own pages up to its own length (inside its attention window), never up
to the longest slot. A group's items name consecutive logical pages, ascending, groups
in order and padding last (both `work_in_graph` and `ragged_work` list them so; the TPU
kernel relies on it). In XLA each item's scores are computed on its page alone and the
items of a group combined by a segment-wise log-sum-exp (the online softmax of
FlashAttention, arXiv 2205.14135); the kernels fold a group's pages in order. The step
builds its list itself (`lcx.attention.ragged_paged_xla.work_in_graph`, one shape for
every step; the TPU kernel's grid runs only its real steps, a dynamic extent). A
`PageLayout` can carry lists made on the host instead (`ragged_work`: the step's items,
padded to a power of two, padding items naming the group past the last, whose results
are dropped), at one compiled step per bucket.

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
from lcx.attention.ragged_paged_xla import group_pages, ragged_paged_attention_xla, work_in_graph
from lcx.cache import AttentionCache, check_decode_rows, query_groups

MIN_ITEMS = 8  # the smallest work-list bucket

# Backends on which the engine cuts the work lists to the step's items on the host, in
# power-of-two buckets (`ragged_work`): none. Everywhere the step builds its list itself
# (`work_in_graph`): no compiled variant per bucket (the paged engine compiled 25 step
# variants on a request trace, and stalled on each new one). The TPU kernel took the
# host's lists while its grid was one step per list item; its grid now runs only the
# list's real steps.
HOST_WORK_BACKENDS = ()


class PageLayout(NamedTuple):
    """Where one step's tokens live and what its queries read.

    `table_SxP`: each slot's physical pages, in order ([slots, pages per slot]).
    `decode_group_W`, `decode_page_W`: the decode queries' work items (the slot, a logical
    page of it); `chunk_group_W`, `chunk_page_W`: the chunk blocks' (the block's index,
    a logical page of its slot), group-major, each group's pages consecutive and ascending.
    A group index past the last group marks padding, after every real item. The
    item lists are None where the step builds them (`work_in_graph`), and for a step that
    only writes (prepacked prefill).
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
    host_lists = (
        (pages.decode_group_W, pages.decode_page_W),
        (pages.chunk_group_W, pages.chunk_page_W),
    )
    groups = query_groups(segment_ids[0], positions[0], offset_S, s, d, jnp)
    parts = []
    for (real_GxC, index_GxC, slot_G, at), lists in zip(
        groups, host_lists[: len(groups)], strict=True
    ):
        if lists[0] is None:
            per_slot = pages.table_SxP.shape[1]
            lists = work_in_graph(real_GxC, index_GxC, cache.page_size, per_slot, window)
        parts.append(
            ragged(
                q[0, at].reshape(*real_GxC.shape, *q.shape[2:]),
                real_GxC,
                positions[0, at].reshape(real_GxC.shape),
                slot_G,
                *lists,
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


def ragged_reads(
    segment_ids_T, positions_T, slots, offset_S, page_size, window=None, decode_rows=None
):
    """(decode, chunks): the pages one engine row's decode and chunk queries read (its
    work lists' real items, `ragged_work`'s arguments), counted on the host."""
    groups = _host_pages(segment_ids_T, positions_T, slots, offset_S, page_size, window,
                         decode_rows)  # fmt: skip
    return tuple(int(count_G.sum()) for _, count_G, _ in groups)


def ragged_work(
    segment_ids_T, positions_T, slots, offset_S, page_size, window=None, decode_rows=None
):
    """The work items of one engine row (host side): a PageLayout's four item lists,
    each padded to a power of two (at least MIN_ITEMS), and the real items' counts
    (decode, chunks): the pages the step reads.

    Group `s` (decode: the row's first `decode_rows`, default `slots`, queries, C per
    slot) reads slot s's pages up to its last token's index; chunk block `b` reads its
    slot's pages up to its last token's index; with a window, from the first page any of
    its queries can see (`work_in_graph` builds the same items in the step).
    """
    lists, counts = [], []
    groups = _host_pages(segment_ids_T, positions_T, slots, offset_S, page_size, window,
                         decode_rows)  # fmt: skip
    for first_G, count_G, g in groups:
        n = int(count_G.sum())
        width = max(MIN_ITEMS, 1 << max(n - 1, 0).bit_length())
        group = np.full(width, g, np.int32)
        page = np.zeros(width, np.int32)
        group[:n] = np.repeat(np.arange(len(count_G)), count_G)
        # Each item's place within its group's run, plus the group's first page.
        page[:n] = np.arange(n) - np.repeat(np.cumsum(count_G) - count_G, count_G)
        page[:n] += np.repeat(first_G, count_G)
        lists += [group, page]
        counts.append(n)
    return lists, tuple(counts)


def _host_pages(segment_ids_T, positions_T, slots, offset_S, page_size, window, decode_rows):
    """(first_G, count_G, G) of the row's decode groups, then its chunk blocks (none
    where the row has none), on the host."""
    segment_ids_T, positions_T, offset_S = (
        np.asarray(x, np.int64) for x in (segment_ids_T, positions_T, offset_S)
    )
    d = slots if decode_rows is None else decode_rows
    parts = query_groups(segment_ids_T, positions_T, offset_S, slots, d, np)
    groups = [
        (*group_pages(real, index, page_size, window, np), len(slot))
        for real, index, slot, _ in parts
    ]
    if len(groups) == 1:
        groups.append((np.zeros(0, np.int64), np.zeros(0, np.int64), 0))
    return groups
