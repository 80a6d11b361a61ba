"""Ragged paged attention for GPU in Pallas (Triton): the serving engine's paged read.

The work-list layout of Ragged Paged Attention (tpu-inference, the vLLM TPU backend's
`ragged_paged_attention` kernel) over the page pool of PagedAttention (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention",
SOSP 2023, arXiv 2309.06180), with FlashAttention's online softmax (Dao et al.,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022,
arXiv 2205.14135) across a group's pages.

One program per (query group, kv head). The host lists items group-major, so a group's
items are one range of the list, [lo, hi) (a binary search before the call: groups ascend);
the program loops over it, loading each item's page from the pool with the physical page
index the item names (looked up in the page table before the call): no gather in XLA.
A group with no items (hi == lo) writes 0 and lse -inf; padding items lie past every
group's range and are never visited.

Layout: the queries of a group are [K, rows, D] (head h = k * R + r, rows = C * R padded
to a power of two >= 16 for `tl.dot`, `lcx.attention.ragged_paged_common`); the pool
[N, P, K, D] is read as it is, a [P, D] tile of one kv head per item.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcx.attention.kernel_common import MASK_VALUE
from lcx.attention.pallas_gpu import plgpu
from lcx.attention.ragged_paged_common import (
    by_kv_head,
    check_inputs,
    from_kv_heads,
    item_pages,
    per_row,
)

NAME = "ragged_paged_attention_gpu"
_MIN_DIM = 16  # tl.dot needs every matrix dimension >= 16


def _dot(a, b, trans_b=False):
    """`plgpu.dot`, float32-accumulated: IEEE float32 for float32 operands (Triton's
    default is TF32), the tensor cores for 16-bit ones."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def _kernel(
    lo_ref,
    hi_ref,  # [G]: each group's item range
    physical_ref,
    start_ref,  # [W]: each item's physical page and first key position
    q_ref,
    pos_ref,
    real_ref,  # this group's rows of this kv head
    k_ref,
    v_ref,  # this kv head of the whole pool, [N, P, D]
    o_ref,
    lse_ref,
    *,
    window,
):
    """Online softmax of one (group, kv head) over the pages of the group's items."""
    g = pl.program_id(0)
    rows, d = q_ref.shape
    size = k_ref.shape[1]
    q, q_pos = q_ref[...], pos_ref[...][:, None]
    real = (real_ref[...] != 0)[:, None]

    def body(w, carry):
        acc, m_prev, l_prev = carry
        page = physical_ref[w]
        k, v = k_ref[page].astype(q.dtype), v_ref[page]
        kv_pos = start_ref[w] + jnp.arange(size, dtype=jnp.int32)[None, :]
        visible = (kv_pos <= q_pos) & real
        if window is not None:
            visible &= q_pos - kv_pos < window
        s = jnp.where(visible, _dot(q, k, trans_b=True) * d**-0.5, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(lo_ref[g], hi_ref[g], body, init)
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def _check_tiles(q_GxCxHxD, cache, interpret):
    """NotImplementedError for what Triton cannot tile or this JAX cannot run."""
    if plgpu is None:
        raise NotImplementedError(f"{NAME}: jax.experimental.pallas.triton is not available")
    d, size = q_GxCxHxD.shape[3], cache.k.shape[1]
    for name, value in (("head_dim", d), ("page_size", size)):
        if not interpret and (value < _MIN_DIM or value & (value - 1)):
            raise NotImplementedError(
                f"pallas_gpu: {name}={value} must be a power of two >= {_MIN_DIM} for Triton"
            )


def ragged_paged_attention_gpu(
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
    """(out [G*C, H, D], lse [G*C, H]) of G query groups against their work items' pages.

    Computes what `ragged_paged_xla.ragged_paged_attention_xla` does, in one Pallas
    Triton kernel; the arguments are `ragged_paged_tpu.ragged_paged_attention_tpu`'s.

    Returns:
      out in q's dtype, 0 where a query saw no key; lse float32, natural, -inf there.
    """
    check_inputs(NAME, q_GxCxHxD, real_GxC, positions_GxC, group_W, page_W, cache)
    _check_tiles(q_GxCxHxD, cache, interpret)
    g, c, h, d = q_GxCxHxD.shape
    n, size, kv_heads, _ = cache.k.shape
    r = h // kv_heads
    rows = max(_MIN_DIM, 1 << (c * r - 1).bit_length())
    group_W, physical_W, start_W = item_pages(group_W, page_W, slot_G, table, offset_S, size)
    groups = jnp.arange(g, dtype=jnp.int32)
    lo_G = jnp.searchsorted(group_W, groups, side="left").astype(jnp.int32)
    hi_G = jnp.searchsorted(group_W, groups, side="right").astype(jnp.int32)

    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)  # noqa: E731
    group_rows = pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0))
    mask_rows = pl.BlockSpec((None, rows), lambda i, j: (i, 0))
    pool_head = pl.BlockSpec((n, size, None, d), lambda i, j: (0, 0, j, 0))
    out, lse = pl.pallas_call(
        functools.partial(_kernel, window=window),
        grid=(g, kv_heads),
        in_specs=[
            *map(whole, (lo_G, hi_G, physical_W, start_W)),
            group_rows,
            mask_rows,
            mask_rows,
            pool_head,
            pool_head,
        ],
        out_specs=[group_rows, pl.BlockSpec((None, None, rows), lambda i, j: (i, j, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((g, kv_heads, rows, d), q_GxCxHxD.dtype),
            jax.ShapeDtypeStruct((g, kv_heads, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
        name="lcx_ragged_paged_attention",
    )(
        lo_G,
        hi_G,
        physical_W,
        start_W,
        by_kv_head(q_GxCxHxD, kv_heads, rows),
        per_row(positions_GxC, r, rows),
        per_row(real_GxC, r, rows),
        cache.k,
        cache.v,
    )
    return from_kv_heads(out, lse, c, r)
