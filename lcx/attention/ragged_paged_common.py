"""What the ragged paged attention kernels share: input checks, item pages, head layout.

The kernels (`ragged_paged_tpu`, `ragged_paged_gpu`) compute `ragged_paged_xla`'s ragged
read (Ragged Paged Attention's work list over PagedAttention's page pool, arXiv
2309.06180). Both arrange a group's queries by kv head, [K, C * R, D] with head
h = k * R + r, so each kv head is one product against the keys of the pages it reads at
once (one page on GPU, up to `ragged_paged_tpu.KEYS_PER_STEP` keys on TPU).
"""

from __future__ import annotations

import jax.numpy as jnp

KERNEL_DTYPES = ("bfloat16", "float16", "float32")  # float32 accumulators


def check_inputs(name, q_GxCxHxD, real_GxC, positions_GxC, group_W, page_W, cache):
    """ValueError for inconsistent shapes; NotImplementedError for other dtypes."""
    g, c, h, d = q_GxCxHxD.shape
    k_shape, v_shape = cache.k.shape, cache.v.shape
    if len(k_shape) != 4 or k_shape != v_shape or k_shape[3] != d or h % k_shape[2]:
        raise ValueError(
            f"{name}: {q_GxCxHxD.shape=} needs cache.k and cache.v of one shape "
            f"[pages, page_size, K, {d}] with {h} % K == 0; got {k_shape=} and {v_shape=}"
        )
    if real_GxC.shape != (g, c) or positions_GxC.shape != (g, c):
        raise ValueError(
            f"{name}: {q_GxCxHxD.shape=} needs real and positions of shape {(g, c)}; got "
            f"{real_GxC.shape=} and {positions_GxC.shape=}"
        )
    if group_W.ndim != 1 or group_W.shape != page_W.shape or not group_W.shape[0]:
        raise ValueError(
            f"{name}: group_W and page_W must be one non-empty list of work items; got "
            f"{group_W.shape=} and {page_W.shape=}"
        )
    dtypes = {jnp.dtype(x.dtype) for x in (q_GxCxHxD, cache.k, cache.v)}
    if not dtypes <= {jnp.dtype(t) for t in KERNEL_DTYPES}:
        raise NotImplementedError(f"{name}: the kernel takes {KERNEL_DTYPES}; got {dtypes}")


def item_pages(group_W, page_W, slot_G, table, offset_S, page_size):
    """(group_W, physical_W, start_W) int32: each item's group (G for padding), physical
    page and first key position. Padding items keep the last real item's page, so a
    kernel that skips unchanged blocks fetches nothing for them."""
    g = slot_G.shape[0]
    group_W = jnp.minimum(group_W, g).astype(jnp.int32)
    valid_W = group_W < g
    slot_W = slot_G[jnp.minimum(group_W, g - 1)]
    physical_W = table[slot_W, page_W]
    last_real = jnp.maximum(jnp.sum(valid_W) - 1, 0)
    physical_W = jnp.where(valid_W, physical_W, physical_W[last_real]).astype(jnp.int32)
    start_W = (offset_S[slot_W] + page_W * page_size).astype(jnp.int32)
    return group_W, physical_W, start_W


def by_kv_head(q_GxCxHxD, kv_heads, rows):
    """q as [G, K, rows, D]: row c * R + r of kv head k is head k * R + r of query c;
    rows past C * R are zero."""
    g, c, h, d = q_GxCxHxD.shape
    r = h // kv_heads
    q = q_GxCxHxD.reshape(g, c, kv_heads, r, d).transpose(0, 2, 1, 3, 4)
    q = q.reshape(g, kv_heads, c * r, d)
    return jnp.pad(q, ((0, 0), (0, 0), (0, rows - c * r), (0, 0)))


def per_row(x_GxC, heads_per_kv, rows):
    """[G, rows] int32: each query's value on its R rows (by_kv_head's order); 0 past C * R."""
    x = jnp.repeat(x_GxC.astype(jnp.int32), heads_per_kv, axis=1)
    return jnp.pad(x, ((0, 0), (0, rows - x.shape[1])))


def from_kv_heads(out_GxKxQxD, lse_GxKxQ, c, heads_per_kv):
    """(out [G*C, H, D], lse [G*C, H]) from by_kv_head's layout."""
    g, kv_heads, _, d = out_GxKxQxD.shape
    r, h = heads_per_kv, kv_heads * heads_per_kv
    out = out_GxKxQxD[:, :, : c * r].reshape(g, kv_heads, c, r, d)
    lse = lse_GxKxQ[:, :, : c * r].reshape(g, kv_heads, c, r)
    return (
        out.transpose(0, 2, 1, 3, 4).reshape(g * c, h, d),
        lse.transpose(0, 2, 1, 3).reshape(g * c, h),
    )
