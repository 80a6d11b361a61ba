"""Packed attention for TPU in Pallas (Mosaic), forward and backward, skipping per row.

FlashAttention-2's online softmax (Dao, arXiv 2307.08691) over a grid
(batch, head, q block, kv block). The per-row block schedule of `lcx.attention.layout`
(Prepacking, arXiv 2404.09529; Dataset Decomposition, arXiv 2405.13226) is
scalar-prefetched: the K/V `index_map` clamps the kv block index into the row's live
interval, so a skipped grid step re-requests the block already resident (no DMA), and
`pl.when` skips its compute. Blocks inside one document, below the diagonal and inside
the window take a branch without the element mask.

Backward: a dq kernel with the same kv-block skipping, and a dkv kernel over the
transposed schedule (q blocks per kv block), wired with `jax.custom_vjp` and the
log-sum-exp saved by the forward pass. Grouped-query heads: K/V blocks are indexed by
`head // group`; dk and dv are computed per query head and summed over the group.

Layout: the wrapper takes DESIGN.md's [B, T, H, D] and transposes to [B, H, T, D] so
Mosaic's last two block dimensions are (block, head_dim).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcx.attention.kernel_common import MASK_VALUE, BlockSizes, padded_inputs
from lcx.attention.layout import block_schedule
from lcx.attention.reference import check_attention_args

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)
_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


def _broadcast_lanes(x_Nx1, n):
    """A [rows, 1] column as [rows, n]."""
    return jnp.broadcast_to(x_Nx1, (x_Nx1.shape[0], n))


def _clamp(j, lo, hi):
    """j clamped into [lo, max(lo, hi)]: an empty interval re-requests block lo."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi, lo))


def _element_mask(q_seg, k_seg, q_start, k_start, shape, *, causal, window):
    """Visibility of a (q block, kv block) tile: same document, causal, window."""
    q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = (q_seg == k_seg) & (q_seg != 0)
    if causal:
        mask &= k_idx <= q_idx
    if window is not None:
        mask &= jnp.abs(q_idx - k_idx) < window
    return mask


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,  # scalar prefetch [B, nq]
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref,  # blocks
    o_ref, lse_ref, *rest,  # outputs (+ block counter), then scratch
    scale, causal, window, count,
):  # fmt: skip
    """One (batch, head, q block, kv block) step of the online softmax."""
    count_ref, (m_sc, l_sc, acc_sc) = (rest[0], rest[1:]) if count else (None, rest)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    lo, hi = kv_lo_ref[b, i], kv_hi_ref[b, i]
    live = (j >= lo) & (j <= hi)
    full = (j >= full_lo_ref[b, i]) & (j <= full_hi_ref[b, i])

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        if count:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            kv_block = _clamp(j, lo, hi)
            mask = _element_mask(
                q_seg_ref[...], k_seg_ref[...], i * block_q, kv_block * block_kv,
                s.shape, causal=causal, window=window,
            )  # fmt: skip
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _broadcast_lanes(m_next[:, :1], block_kv))
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _broadcast_lanes(alpha[:, :1], acc_sc.shape[1]) + pv
        if count:
            count_ref[...] += 1

    pl.when(live & full)(lambda: step(masked=False))
    pl.when(live & ~full)(lambda: step(masked=True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[:, :1]
        real = (q_seg_ref[...] != 0) & (l > 0)
        inv = jnp.where(real, 1.0 / jnp.where(real, l, 1.0), 0.0)
        o_ref[...] = (acc_sc[...] * _broadcast_lanes(inv, acc_sc.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(real, m_sc[:, :1] + jnp.log(jnp.where(real, l, 1.0)), 0.0)


def _kv_index_map(group):
    """K/V block index: the query head's kv head, the kv block clamped into the row's range."""

    def index_map(b, h, i, j, kv_lo_ref, kv_hi_ref, *_):
        # lax.div: Mosaic lowers jnp floor division through sign(), which needs a TPU.
        return b, jax.lax.div(h, group), _clamp(j, kv_lo_ref[b, i], kv_hi_ref[b, i]), 0

    return index_map


def _forward(q, k, v, seg, sched, *, scale, causal, window, blocks, interpret, count=False):
    """Pallas forward on [B, H, T, D] inputs; returns (o, lse[B, H, T, 1], counts?)."""
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    bq, bk = blocks
    nq, nk = t // bq, t // bk
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, *_: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), _kv_index_map(group))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, j, *_: (b_, h, i, 0))
    q_seg_spec = pl.BlockSpec((None, bq, 1), lambda b_, h, i, j, *_: (b_, i, 0))

    def k_seg_index(b_, h, i, j, kv_lo_ref, kv_hi_ref, *_):
        return b_, 0, _clamp(j, kv_lo_ref[b_, i], kv_hi_ref[b_, i])

    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, hq, t, 1), jnp.float32),
    ]
    out_specs = [q_spec, row_spec]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, nq, 1), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1, 1), lambda b_, h, i, j, *_: (b_, h, i, 0)))
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window, count=count)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, hq, nq, nk),
            in_specs=[
                q_spec, kv_spec, kv_spec, q_seg_spec,
                pl.BlockSpec((None, 1, bk), k_seg_index),
            ],  # fmt: skip
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, _LANES), jnp.float32),
                pltpu.VMEM((bq, _LANES), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(
        sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi,
        q, k, v, seg[:, :, None], seg[:, None, :],
    )  # fmt: skip
    return outs


# ---------------------------------------------------------------------------- backward


def _probabilities(q, k, q_seg, k_seg, lse, q_start, k_start, *, scale, causal, window, masked):
    """Recomputed softmax probabilities of one tile, zero where masked."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - _broadcast_lanes(lse, s.shape[1]))
    if masked:
        mask = _element_mask(q_seg, k_seg, q_start, k_start, s.shape, causal=causal, window=window)
        p = jnp.where(mask, p, 0.0)
    return p


def _dq_kernel(
    kv_lo_ref, kv_hi_ref, full_lo_ref, full_hi_ref,
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, lse_ref, delta_ref, do_ref,
    dq_ref, *rest,
    scale, causal, window, count,
):  # fmt: skip
    """dq for one q block, accumulated over the row's live kv blocks."""
    count_ref, (dq_sc,) = (rest[0], rest[1:]) if count else (None, rest)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    lo, hi = kv_lo_ref[b, i], kv_hi_ref[b, i]
    live = (j >= lo) & (j <= hi)
    full = (j >= full_lo_ref[b, i]) & (j <= full_hi_ref[b, i])

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        if count:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(
            q, k, q_seg_ref[...], k_seg_ref[...], lse_ref[...],
            i * block_q, _clamp(j, lo, hi) * block_kv,
            scale=scale, causal=causal, window=window, masked=masked,
        )  # fmt: skip
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _broadcast_lanes(delta_ref[...], dp.shape[1])) * scale
        dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        if count:
            count_ref[...] += 1

    pl.when(live & full)(lambda: step(masked=False))
    pl.when(live & ~full)(lambda: step(masked=True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(
    q_lo_ref, q_hi_ref, full_lo_ref, full_hi_ref,
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, lse_ref, delta_ref, do_ref,
    dk_ref, dv_ref, *rest,
    scale, causal, window, count,
):  # fmt: skip
    """dk, dv for one kv block (per query head), accumulated over live q blocks."""
    count_ref, (dk_sc, dv_sc) = (rest[0], rest[1:]) if count else (None, rest)
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    lo, hi = q_lo_ref[b, j], q_hi_ref[b, j]
    live = (i >= lo) & (i <= hi)
    full = (i >= full_lo_ref[b, j]) & (i <= full_hi_ref[b, j])

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        if count:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(
            q, k, q_seg_ref[...], k_seg_ref[...], lse_ref[...],
            _clamp(i, lo, hi) * block_q, j * block_kv,
            scale=scale, causal=causal, window=window, masked=masked,
        )  # fmt: skip
        dv_sc[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32
        )
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _broadcast_lanes(delta_ref[...], dp.shape[1])) * scale
        dk_sc[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32
        )
        if count:
            count_ref[...] += 1

    pl.when(live & full)(lambda: step(masked=False))
    pl.when(live & ~full)(lambda: step(masked=True))

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(
    q, k, v, seg, o, lse, do, *, scale, causal, window, block_sizes, interpret, count=False
):  # fmt: skip
    """dq, dk, dv on [B, H, T, D] inputs.

    With `count`, also the blocks each kernel computed: dq's kv blocks per q block
    [B, H, T / block_q_dq] and dkv's q blocks per kv block [B, H, T / block_kv_dkv].
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )

    bq, bk = block_sizes.dq
    sched = block_schedule(seg, block_q=bq, block_kv=bk, causal=causal, window=window)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, *_: (b_, h, i, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, j, *_: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), _kv_index_map(group))

    def k_seg_index(b_, h, i, j, lo_ref, hi_ref, *_):
        return b_, 0, _clamp(j, lo_ref[b_, i], hi_ref[b_, i])

    count_spec = pl.BlockSpec((None, None, 1, 1), lambda b_, h, i, j, *_: (b_, h, i, 0))
    dq_out = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, window=window, count=count),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, hq, t // bq, t // bk),
            in_specs=[
                q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, 1), lambda b_, h, i, j, *_: (b_, i, 0)),
                pl.BlockSpec((None, 1, bk), k_seg_index),
                row_spec, row_spec, q_spec,
            ],  # fmt: skip
            out_specs=[q_spec, count_spec] if count else q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=(
            [
                jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, hq, t // bq, 1), jnp.int32),
            ]
            if count
            else jax.ShapeDtypeStruct(q.shape, q.dtype)
        ),
        compiler_params=params,
        interpret=interpret,
    )(
        sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi,
        q, k, v, q_seg, k_seg, lse, delta, do,
    )  # fmt: skip

    bq, bk = block_sizes.dkv
    sched = block_schedule(seg, block_q=bq, block_kv=bk, causal=causal, window=window)

    def q_index(b_, h, j, i, lo_ref, hi_ref, *_):
        return b_, h, _clamp(i, lo_ref[b_, j], hi_ref[b_, j]), 0

    def q_seg_index(b_, h, j, i, lo_ref, hi_ref, *_):
        return b_, _clamp(i, lo_ref[b_, j], hi_ref[b_, j]), 0

    q_spec = pl.BlockSpec((None, None, bq, d), q_index)
    row_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    kv_spec = pl.BlockSpec(
        (None, None, bk, d), lambda b_, h, j, i, *_: (b_, jax.lax.div(h, group), j, 0)
    )
    out_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, i, *_: (b_, h, j, 0))
    out_shape = [jax.ShapeDtypeStruct((b, hq, t, d), k.dtype)] * 2
    out_specs = [out_spec, out_spec]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, t // bk, 1), jnp.int32))
        out_specs.append(count_spec)
    dkv_out = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, window=window, count=count),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, hq, t // bk, t // bq),
            in_specs=[
                q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, 1), q_seg_index),
                pl.BlockSpec((None, 1, bk), lambda b_, h, j, i, *_: (b_, 0, j)),
                row_spec, row_spec, q_spec,
            ],  # fmt: skip
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
    )(
        sched.q_lo, sched.q_hi, sched.q_full_lo, sched.q_full_hi,
        q, k, v, q_seg, k_seg, lse, delta, do,
    )  # fmt: skip
    dq = dq_out[0] if count else dq_out
    dk, dv = dkv_out[:2]
    if group > 1:
        dk = dk.reshape(b, hkv, group, t, d).sum(axis=2).astype(k.dtype)
        dv = dv.reshape(b, hkv, group, t, d).sum(axis=2).astype(v.dtype)
    if count:
        return dq, dk, dv, dq_out[1][..., 0], dkv_out[2][..., 0]
    return dq, dk, dv


# ------------------------------------------------------------------------ public wrapper


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attention_bhtd(q, k, v, seg, scale, causal, window, block_sizes, interpret):
    """Packed attention on padded [B, H, T, D] inputs, differentiable in q, k, v."""
    return _attention_fwd(q, k, v, seg, scale, causal, window, block_sizes, interpret)[0]


def _attention_fwd(q, k, v, seg, scale, causal, window, block_sizes, interpret):
    """custom_vjp forward: output and residuals."""
    blocks = (block_sizes.block_q, block_sizes.block_kv)
    sched = block_schedule(seg, block_q=blocks[0], block_kv=blocks[1], causal=causal, window=window)
    o, lse = _forward(
        q, k, v, seg, sched, scale=scale, causal=causal, window=window, blocks=blocks,
        interpret=interpret,
    )  # fmt: skip
    return o, (q, k, v, seg, o, lse)


def _attention_bwd(scale, causal, window, block_sizes, interpret, residuals, do):
    """custom_vjp backward: dq, dk, dv (no gradient for segment ids)."""
    q, k, v, seg, o, lse = residuals
    dq, dk, dv = _backward(
        q, k, v, seg, o, lse, do, scale=scale, causal=causal, window=window,
        block_sizes=block_sizes, interpret=interpret,
    )  # fmt: skip
    return dq, dk, dv, None


_attention_bhtd.defvjp(_attention_fwd, _attention_bwd)


def packed_attention_tpu(
    q, k, v, segment_ids=None, *, causal=True, window=None, scale=None, block_sizes=None,
    interpret=False, count_blocks=False,
):  # fmt: skip
    """Packed attention through the Pallas TPU kernels; [B, T, H, D] in and out.

    With `count_blocks`, returns (out, counts) where counts [B, Hq, T / block_q] is the
    number of kv blocks the forward kernel computed for each q block (no gradient).
    """
    check_attention_args(q, k, v, segment_ids, window)
    block_sizes = block_sizes or DEFAULT_BLOCK_SIZES
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, seg = padded_inputs(q, k, v, segment_ids, block_sizes.multiple)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if count_blocks:
        blocks = (block_sizes.block_q, block_sizes.block_kv)
        sched = block_schedule(seg, block_q=blocks[0], block_kv=blocks[1], causal=causal,
                               window=window)  # fmt: skip
        o, _, counts = _forward(
            q, k, v, seg, sched, scale=scale, causal=causal, window=window, blocks=blocks,
            interpret=interpret, count=True,
        )  # fmt: skip
        return o.transpose(0, 2, 1, 3)[:, :t], counts[..., 0]
    o = _attention_bhtd(q, k, v, seg, scale, causal, window, block_sizes, interpret)
    return o.transpose(0, 2, 1, 3)[:, :t]


def tpu_implementation(q, k, v, segment_ids, *, causal, window, scale, block_sizes, interpret):
    """IMPLEMENTATIONS entry; named explicitly it runs on any backend (to export for TPU)."""
    return packed_attention_tpu(
        q, k, v, segment_ids, causal=causal, window=window, scale=scale,
        block_sizes=block_sizes, interpret=interpret,
    )  # fmt: skip
