"""The ragged paged read in XLA: query groups against the pages their work items name.

The work-list layout of tpu-inference's Ragged Paged Attention over PagedAttention's page
pool (Kwon et al., arXiv 2309.06180): each item (a group, a logical page of its slot) has
its scores computed on its page alone, and a group's items are combined by the online
softmax of FlashAttention (arXiv 2205.14135). This is the read on every backend without a
kernel and the reference the Pallas kernels (`ragged_paged_tpu`, `_gpu`) are held to.

The items run through a loop over blocks of `ITEM_BLOCK` that stops after the last real
item, so padding past that block is not read and each block's gathered pages are used
while they are still in the processor's cache (gathering every item's page at once cost a
copy of the step's whole read, written out and read back, in every layer).

Work lists come from `work_in_graph`, built in the step (a paged cache's, and
`lcx.cache`'s one stretch per slot, read in pages of its rows by
`ragged_stretch_attention_xla`), or from the host (`lcx.paged_cache.ragged_work`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcx.attention.kernel_common import MASK_VALUE, natural_lse, products_precision

# Work items per step of the loop (a power of two; 16-64 ran alike, 128 slower, hidden 768
# at 32 slots on 2 CPU cores).
ITEM_BLOCK = 32


def ragged_paged_attention_xla(
    q_GxCxHxD,
    real_GxC,
    positions_GxC,
    slot_G,
    group_W,
    page_W,
    *,
    cache,
    table,
    offset_S,
    window,
    interpret=False,
):
    """(out [G*C, H, D], lse [G*C, H]): query group g against the pages of its items.

    `cache`: k and v [pages, page_size, K, D]; `table` [slots, pages per slot]: each
    slot's physical pages; group g's queries belong to slot `slot_G[g]`, real where
    `real_GxC`; item w reads logical page `page_W[w]` for group `group_W[w]` (G and up:
    padding, after every real item). `interpret` is the kernels' argument, unused here.
    """
    del interpret
    size = cache.k.shape[1]
    offset_S = jnp.asarray(offset_S)

    def read(slot_B, page_B):
        """The items' pages, their keys' positions, all rows valid."""
        physical_B = table[slot_B, page_B]
        kv_pos_BxP = offset_S[slot_B][:, None] + page_B[:, None] * size + jnp.arange(size)
        return cache.k[physical_B], cache.v[physical_B], kv_pos_BxP, None

    return _item_loop(
        q_GxCxHxD, real_GxC, positions_GxC, slot_G, group_W, page_W, read, cache.k.shape[2],
        window,
    )  # fmt: skip


def ragged_stretch_attention_xla(
    q_GxCxHxD, real_GxC, positions_GxC, slot_G, group_W, page_W, *, k, v, page_size, offset_S,
    window,
):  # fmt: skip
    """`ragged_paged_attention_xla` over one stretch per slot, k and v [S, L, K, D]: item
    w reads rows page_W[w] * page_size onwards of its slot's stretch (the last page of a
    stretch whose length page_size does not divide starts earlier, at L - page_size, and
    masks the rows the page before covered), so no copy of the whole cache is made."""
    length = k.shape[1]
    offset_S = jnp.asarray(offset_S)

    def read(slot_B, page_B):
        """The items' rows (gathered), their keys' positions, the rows this item owns."""
        first_B = page_B * page_size
        start_B = jnp.minimum(first_B, length - page_size)
        rows_BxP = start_B[:, None] + jnp.arange(page_size)

        def gather(x):
            """Each item's run of rows, one contiguous slice each (a row-wise gather ran
            slower)."""
            take = lambda s, r: jax.lax.dynamic_slice_in_dim(x[s], r, page_size)  # noqa: E731
            return jax.vmap(take)(slot_B, start_B)

        kv_pos_BxP = offset_S[slot_B][:, None] + rows_BxP
        return gather(k), gather(v), kv_pos_BxP, rows_BxP >= first_B[:, None]

    return _item_loop(
        q_GxCxHxD, real_GxC, positions_GxC, slot_G, group_W, page_W, read, k.shape[2], window
    )


def _item_loop(q_GxCxHxD, real_GxC, positions_GxC, slot_G, group_W, page_W, read, kv_heads,
               window):  # fmt: skip
    """The items run in blocks of `ITEM_BLOCK` through a loop that stops after the block
    of the last real item, carrying each group's running max, sum and output (the online
    softmax). `read(slot_B, page_B)`: the block's keys and values [B, P, K, D], their
    positions [B, P] and which of them the items own ([B, P] bool, or None for all)."""
    real_GxC, positions_GxC, slot_G = map(jnp.asarray, (real_GxC, positions_GxC, slot_G))
    g, c, h, d = q_GxCxHxD.shape
    r = h // kv_heads
    block = math.gcd(ITEM_BLOCK, group_W.shape[0])
    blocks_W = group_W.reshape(-1, block)
    pages_W = page_W.reshape(-1, block)
    acc = jnp.promote_types(q_GxCxHxD.dtype, jnp.float32)
    precision = products_precision(q_GxCxHxD.dtype)
    q_GxKxRxCxD = jnp.moveaxis(q_GxCxHxD.reshape(g, c, kv_heads, r, d), 1, 3)

    def one_block(i, carry):
        """Fold block i's items into each group's running max, sum and output."""
        m_G, l_G, o_G = carry
        group_B, page_B = blocks_W[i], pages_W[i]
        at_B = jnp.minimum(group_B, g - 1)
        k_BxPxKxD, v_BxPxKxD, kv_pos_BxP, owned_BxP = read(slot_G[at_B], page_B)
        logits = (
            jnp.einsum(
                "bkrcd,bpkd->bkrcp",
                q_GxKxRxCxD[at_B],
                k_BxPxKxD.astype(q_GxCxHxD.dtype),
                preferred_element_type=acc,
                precision=precision,
            )
            * d**-0.5
        )
        q_pos_BxC = positions_GxC[at_B]
        visible = (kv_pos_BxP[:, None, :] <= q_pos_BxC[:, :, None]) & real_GxC[at_B][:, :, None]
        if window is not None:
            visible &= q_pos_BxC[:, :, None] - kv_pos_BxP[:, None, :] < window
        if owned_BxP is not None:
            visible &= owned_BxP[:, None, :]
        visible = (visible & (group_B < g)[:, None, None])[:, None, None]  # [B, 1, 1, C, P]
        logits = jnp.where(visible, logits, MASK_VALUE)
        block_max = jax.ops.segment_max(logits.max(axis=-1), group_B, num_segments=g + 1)
        new_m_G = jnp.maximum(m_G, block_max)
        p = jnp.where(visible, jnp.exp(logits - new_m_G[group_B][..., None]), 0.0)
        o_B = jnp.einsum(
            "bkrcp,bpkd->bkrcd",
            p.astype(v_BxPxKxD.dtype),
            v_BxPxKxD,
            preferred_element_type=acc,
            precision=precision,
        )
        rescale = jnp.exp(m_G - new_m_G)
        l_G = l_G * rescale + jax.ops.segment_sum(p.sum(axis=-1), group_B, num_segments=g + 1)
        o_G = o_G * rescale[..., None] + jax.ops.segment_sum(o_B, group_B, num_segments=g + 1)
        return new_m_G, l_G, o_G

    real_blocks = -(-jnp.sum(group_W < g) // block)
    start = (
        jnp.full((g + 1, kv_heads, r, c), MASK_VALUE, acc),
        jnp.zeros((g + 1, kv_heads, r, c), acc),
        jnp.zeros((g + 1, kv_heads, r, c, d), acc),
    )
    m_G, l_G, o_G = (x[:g] for x in jax.lax.fori_loop(0, real_blocks, one_block, start))
    seen = l_G > 0
    out = jnp.where(seen[..., None], o_G / jnp.where(seen, l_G, 1.0)[..., None], 0.0)
    lse = natural_lse(m_G + jnp.log(jnp.where(seen, l_G, 1.0)), seen)
    out = jnp.moveaxis(out, 3, 1).reshape(g * c, h, d)  # [G, C, K, R, D]: head = k * R + r
    lse = jnp.moveaxis(lse, 3, 1).reshape(g * c, h)
    return out.astype(q_GxCxHxD.dtype), lse


def group_pages(real_GxC, index_GxC, page_size, window=None, xp=jnp):
    """(first_G, count_G): the first logical page each query group can see and how many
    pages from it, with `xp` numpy (the host's lists) or jax.numpy (the step's).

    `index_GxC`: each query's index in its slot's cache (position - offset). A group sees
    its slot's pages up to its last real query's index; with a window, from the first
    page any of its queries can see; a group with no real query sees none.
    """
    last_G = xp.where(real_GxC, index_GxC, -1).max(axis=1)
    first_G = xp.zeros_like(last_G)
    if window is not None:
        earliest = xp.where(real_GxC, index_GxC, xp.iinfo(xp.int32).max).min(axis=1)
        first_G = xp.maximum(earliest - window + 1, 0) // page_size
    return first_G, xp.where(last_G >= 0, last_G // page_size + 1 - first_G, 0)


def work_in_graph(real_GxC, index_GxC, page_size, pages_per_slot, window=None):
    """(group_W, page_W) int32, computed on the device: every page each query group can
    see (`group_pages`), group by group, padding (group G) last; W is G * pages_per_slot
    rounded up to `ITEM_BLOCK`, so the list's shape never depends on the step (the host's
    `lcx.paged_cache.ragged_work` lists the same items)."""
    g = real_GxC.shape[0]
    first_G, count_G = group_pages(real_GxC, index_GxC, page_size, window)
    end_G = jnp.cumsum(count_G)
    w = jnp.arange(-(-g * pages_per_slot // ITEM_BLOCK) * ITEM_BLOCK, dtype=jnp.int32)
    group_W = jnp.searchsorted(end_G, w, side="right").astype(jnp.int32)  # G past the end
    at_W = jnp.minimum(group_W, g - 1)
    page_W = w - (end_G - count_G)[at_W] + first_G[at_W]
    return group_W, jnp.where(group_W < g, page_W, 0).astype(jnp.int32)
