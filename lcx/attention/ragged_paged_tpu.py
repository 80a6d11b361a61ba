"""Ragged paged attention for TPU in Pallas (Mosaic): the serving engine's paged read.

The work-list layout of Ragged Paged Attention (tpu-inference, the vLLM TPU backend's
`ragged_paged_attention` kernel) over the page pool of PagedAttention (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention",
SOSP 2023, arXiv 2309.06180), with FlashAttention's online softmax (Dao et al.,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022,
arXiv 2205.14135) across a group's pages.

The grid is one step per work item (query group, logical page). Scalar-prefetched
arrays name each item's group, its physical page (looked up in the page table before the
call) and its first key position, and drive the `index_map`s: the q block is the item's
group, the k/v blocks are the item's page read straight from the pool in HBM (no gather
in XLA), and the output block is the item's group, so the items of one group (consecutive:
the host lists them group-major) accumulate (m, l, acc) in VMEM and are written once,
at the group's last item. Padding items name the dummy group G, whose results are dropped;
they point at the last real page, so they fetch nothing new and skip the arithmetic.
A group with no items keeps the zeros (and -inf lse) its aliased outputs start with.

Layout: the pool [N, P, K, D] is read as [N, P, K * D] (a free reshape), one whole page
per step, and each kv head's keys are a lane-aligned slice of it (D a multiple of 128 on
TPU). The queries of a group are arranged [K, Q, D] (head h = k * R + r on row c * R + r,
Q = C * R padded to 16 rows, `lcx.attention.ragged_paged_common`), so each kv head is one
[Q, D] x [D, P] product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcx.attention.kernel_common import MASK_VALUE, products_precision
from lcx.attention.ragged_paged_common import (
    by_kv_head,
    check_inputs,
    from_kv_heads,
    item_pages,
    per_row,
)

NAME = "ragged_paged_attention_tpu"
_LANES = 128
_SUBLANES = 16  # q rows padded to whole (bfloat16-packed) sublane tiles
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_ANY = pl.BlockSpec(memory_space=pl.ANY)  # an aliased output's first value: not read


def _kernel(
    group_ref,
    physical_ref,
    start_ref,  # scalar prefetch: each item's group, physical page, first key position
    q_ref,
    pos_ref,
    real_ref,
    k_ref,
    v_ref,  # blocks
    o_init_ref,
    lse_init_ref,  # aliased to the outputs, unread
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    groups,
    window,
    precision,
):
    """One work item: a group's queries against one page, folded into the running softmax."""
    del physical_ref, o_init_ref, lse_init_ref
    w, n = pl.program_id(0), pl.num_programs(0)
    group = group_ref[w]
    first = (w == 0) | (group_ref[jnp.maximum(w - 1, 0)] != group)
    last = (w == n - 1) | (group_ref[jnp.minimum(w + 1, n - 1)] != group)
    kv_heads, rows, d = q_ref.shape
    size = k_ref.shape[0]

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(group < groups)
    def _compute():
        # int32 tiles, broadcast before comparing: no [rows, 1] boolean is broadcast.
        kv_pos = start_ref[w] + jax.lax.broadcasted_iota(jnp.int32, (rows, size), 1)
        q_pos = jnp.broadcast_to(pos_ref[...], (rows, size))
        visible = (kv_pos <= q_pos) & (jnp.broadcast_to(real_ref[...], (rows, size)) != 0)
        if window is not None:
            visible &= q_pos - kv_pos < window
        for kv in range(kv_heads):
            q = q_ref[kv]
            k = k_ref[:, kv * d : (kv + 1) * d].astype(q.dtype)
            v = v_ref[:, kv * d : (kv + 1) * d]
            s = jax.lax.dot_general(
                q, k, _NT, preferred_element_type=jnp.float32, precision=precision
            )
            s = jnp.where(visible, s * d**-0.5, MASK_VALUE)
            m_prev = m_sc[kv]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(visible, jnp.exp(s - jnp.broadcast_to(m_next[:, :1], s.shape)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_sc[kv] = alpha * l_sc[kv] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[kv] = m_next
            pv = jax.lax.dot(
                p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision
            )
            acc_sc[kv] = acc_sc[kv] * jnp.broadcast_to(alpha[:, :1], (rows, d)) + pv

    @pl.when(last)
    def _finish():
        for kv in range(kv_heads):
            m, l = m_sc[kv][:, :1], l_sc[kv][:, :1]
            seen = l > 0
            safe = jnp.where(seen, l, 1.0)
            out = acc_sc[kv] / jnp.broadcast_to(safe, (rows, d))
            o_ref[kv] = jnp.where(seen, out, 0.0).astype(o_ref.dtype)
            lse_ref[kv] = jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def _check_lanes(q_GxCxHxD, cache, interpret):
    """NotImplementedError unless each kv head's slice of a page is lane-aligned."""
    d, kv_heads = q_GxCxHxD.shape[3], cache.k.shape[2]
    if not interpret and kv_heads > 1 and d % _LANES:
        raise NotImplementedError(
            f"pallas_tpu: with several kv heads the kernel slices pages by head on lanes; "
            f"head_dim={d} must be a multiple of {_LANES}"
        )


def _with_dummy_group(x):
    """x with a zero group G appended: padding items' q block, output and mask rows."""
    return jnp.pad(x, [(0, 1)] + [(0, 0)] * (x.ndim - 1))


def ragged_paged_attention_tpu(
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

    Computes what `ragged_paged_xla.ragged_paged_attention_xla` does, in one Pallas TPU
    kernel.

    Args:
      q_GxCxHxD: G groups of C queries; real_GxC: which queries are real;
        positions_GxC: their positions; slot_G: each group's cache slot.
      group_W, page_W: the work items (a group, a logical page of its slot), group-major;
        padding items name group G.
      cache: anything with `k` and `v`, [num_pages, page_size, K, D] each (a
        `PagedAttentionCache`); table: [slots, pages per slot] physical pages;
        offset_S: each slot's first position; window: None or a sliding window.
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Returns:
      out in q's dtype, 0 where a query saw no key; lse float32, natural, -inf there.
    """
    check_inputs(NAME, q_GxCxHxD, real_GxC, positions_GxC, group_W, page_W, cache)
    _check_lanes(q_GxCxHxD, cache, interpret)
    g, c, h, d = q_GxCxHxD.shape
    n, size, kv_heads, _ = cache.k.shape
    r = h // kv_heads
    rows = -(-c * r // _SUBLANES) * _SUBLANES
    items = item_pages(group_W, page_W, slot_G, table, offset_S, size)
    q_GxKxQxD = _with_dummy_group(by_kv_head(q_GxCxHxD, kv_heads, rows))
    pos_GxQx1 = _with_dummy_group(per_row(positions_GxC, r, rows))[..., None]
    real_GxQx1 = _with_dummy_group(per_row(real_GxC, r, rows))[..., None]
    k_NxPxKD = cache.k.reshape(n, size, kv_heads * d)
    v_NxPxKD = cache.v.reshape(n, size, kv_heads * d)

    def by_group(w, group_ref, *_):
        return group_ref[w], 0, 0

    def by_page(w, group_ref, physical_ref, *_):
        return physical_ref[w], 0, 0

    group_block = pl.BlockSpec((None, kv_heads, rows, d), lambda *a: (*by_group(*a), 0))
    group_rows = pl.BlockSpec((None, kv_heads, rows, 1), lambda *a: (*by_group(*a), 0))
    page_block = pl.BlockSpec((None, size, kv_heads * d), by_page)
    row_block = pl.BlockSpec((None, rows, 1), by_group)
    outs = [
        jnp.zeros((g + 1, kv_heads, rows, d), q_GxCxHxD.dtype),
        jnp.full((g + 1, kv_heads, rows, 1), -jnp.inf, jnp.float32),
    ]
    kernel = functools.partial(
        _kernel, groups=g, window=window, precision=products_precision(q_GxCxHxD.dtype)
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(group_W.shape[0],),
            in_specs=[group_block, row_block, row_block, page_block, page_block, _ANY, _ANY],
            out_specs=[group_block, group_rows],
            scratch_shapes=[
                pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),
                pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),
                pltpu.VMEM((kv_heads, rows, d), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
        input_output_aliases={8: 0, 9: 1},  # after 3 prefetched lists and 5 operands
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(*items, q_GxKxQxD, pos_GxQx1, real_GxQx1, k_NxPxKD, v_NxPxKD, *outs)
    return from_kv_heads(out[:g], lse[:g, ..., 0], c, r)
