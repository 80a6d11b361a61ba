"""Packed attention for GPU in Pallas (Triton), forward and backward, skipping per row.

FlashAttention-2's online softmax (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023, arXiv 2307.08691) with one program per
(q block, batch, head). The per-row block schedule of `lcx.attention.layout`
(Prepacking, Zhao et al. 2024, arXiv 2404.09529: block-diagonal causal masks over packed
prompts) bounds each program's kv loop: `fori_loop(kv_lo, kv_hi + 1)` with the bounds
read from the metadata, so kv blocks of other documents are never loaded. The loop is
split in three: blocks inside [kv_full_lo, kv_full_hi] (one document, below the
diagonal, inside the window) run without the element mask, the blocks on either side
with it.

Backward: a dq kernel (per q block, the same kv loop) and a dkv kernel (per kv block,
a loop over the transposed schedule's q blocks), wired with `jax.custom_vjp` and the
log-sum-exp saved by the forward pass; delta = rowsum(dO * O) in jnp. Grouped-query
heads: K/V are indexed by `head // group`; dk and dv are computed per query head and
summed over the group in the wrapper.

Logits are kept in base 2 (`exp2`, scale folded with log2(e)), as Triton likes it; the
saved log-sum-exp is base 2 as well and never leaves this module.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lcx.attention.kernel_common import MASK_VALUE, BlockSizes, pad_length, padded_inputs
from lcx.attention.layout import block_schedule
from lcx.attention.reference import check_attention_args

# Forward tiles of 64 x 64; dq keeps 64 queries and streams 32 keys, dkv the transpose.
# With head dim 128 in bf16 every tile fits the shared memory of an A100 / H100.
DEFAULT_BLOCK_SIZES = BlockSizes(
    block_q=64, block_kv=64, block_q_dq=64, block_kv_dq=32, block_q_dkv=32, block_kv_dkv=64
)
_MIN_DIM = 16  # tl.dot needs every matrix dimension >= 16
_LOG2E = math.log2(math.e)
_NUM_STAGES = 2
_TRITON_DTYPES = ("float16", "bfloat16", "float32")


def _check_block_sizes(block_sizes: BlockSizes) -> None:
    """ValueError unless every block is a power of two >= 16 (Triton tiles)."""
    for name, value in [
        ("block_q", block_sizes.block_q),
        ("block_kv", block_sizes.block_kv),
        ("block_q_dq / block_kv_dq", block_sizes.dq),
        ("block_q_dkv / block_kv_dkv", block_sizes.dkv),
    ]:
        for size in value if isinstance(value, tuple) else (value,):
            if size < _MIN_DIM or size & (size - 1):
                raise ValueError(
                    f"block_sizes.{name}={value} must be powers of two >= {_MIN_DIM} for Triton"
                )


def _num_warps(block_a: int, block_b: int, head_dim: int) -> int:
    """Warps per program: 8 for large tiles or head dims, else 4."""
    return 8 if head_dim > 64 or block_a * block_b >= 128 * 128 else 4


def _element_mask(q_seg, k_seg, q_start, k_start, *, causal, window):
    """Visibility of a (q block, kv block) tile: same document, not padding, causal, window."""
    q_idx = q_start + jnp.arange(q_seg.shape[0], dtype=jnp.int32)[:, None]
    k_idx = k_start + jnp.arange(k_seg.shape[0], dtype=jnp.int32)[None, :]
    mask = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0)
    if causal:
        mask &= k_idx <= q_idx
    if window is not None:
        mask &= (q_idx - k_idx < window) & (k_idx - q_idx < window)
    return mask


def _visit_blocks(lo, hi, full_lo, full_hi, body, carry):
    """Fold body(j, carry, masked=...) over blocks [lo, hi]; unmasked on [full_lo, full_hi]."""
    no_full = full_hi < full_lo
    f_lo = jnp.where(no_full, hi + 1, jnp.clip(full_lo, lo, hi + 1))
    f_hi = jnp.where(no_full, hi, jnp.clip(full_hi, f_lo - 1, hi))
    carry = jax.lax.fori_loop(lo, f_lo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(f_lo, f_hi + 1, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(f_hi + 1, hi + 1, functools.partial(body, masked=True), carry)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    lo_ref, hi_ref, full_lo_ref, full_hi_ref,  # schedule row [nq]
    q_ref, k_ref, v_ref, q_seg_ref, seg_ref,  # q block, full K/V row, segment ids
    o_ref, lse_ref, *count_ref,  # outputs
    scale, causal, window, block_kv,
):  # fmt: skip
    """Online softmax of one (q block, batch, head) over the row's live kv blocks."""
    i = pl.program_id(0)
    block_q, d = q_ref.shape
    q, q_seg = q_ref[...], q_seg_ref[...]

    def body(j, carry, masked):
        acc, m_prev, l_prev, visited = carry
        kv = pl.ds(j * block_kv, block_kv)
        s = plgpu.dot(q, k_ref[kv, :], trans_b=True) * (scale * _LOG2E)
        if masked:
            mask = _element_mask(
                q_seg, seg_ref[kv], i * block_q, j * block_kv, causal=causal, window=window
            )
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        v = v_ref[kv, :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1), visited + 1

    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.int32(0),
    )
    sched = (lo_ref[i], hi_ref[i], full_lo_ref[i], full_hi_ref[i])
    acc, m, l, visited = _visit_blocks(*sched, body, init)
    # Padding queries see nothing: exactly 0 out, and an lse that zeroes them backward.
    real = (q_seg != 0) & (l > 0)
    l_safe = jnp.where(real, l, 1.0)
    o_ref[...] = jnp.where(real[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(real, m + jnp.log2(l_safe), 0.0)
    if count_ref:
        count_ref[0][...] = jnp.full((block_q,), visited, jnp.int32)


def _schedule_specs(n_blocks):
    """BlockSpecs of the four [B, n_blocks] schedule arrays: this program's batch row."""
    return [pl.BlockSpec((None, n_blocks), lambda _, b_, h: (b_, 0))] * 4


def _forward(q, k, v, seg, *, scale, causal, window, blocks, interpret, count=False):
    """Pallas forward on padded [B, T, H, D]; returns (o, lse2 [B, Hq, T], counts?)."""
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    bq, bk = blocks
    nq = t // bq
    sched = block_schedule(seg, block_q=bq, block_kv=bk, causal=causal, window=window)
    row_block = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, hq, t), jnp.float32),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)), row_block]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, t), jnp.int32))
        out_specs.append(row_block)
    kv_row = pl.BlockSpec((None, t, None, d), lambda i, b_, h: (b_, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window, block_kv=bk),
        grid=(nq, b, hq),
        in_specs=[
            *_schedule_specs(nq),
            pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
            kv_row,
            kv_row,
            pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
            pl.BlockSpec((None, t), lambda i, b_, h: (b_, 0)),
        ],  # fmt: skip
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=_num_warps(bq, bk, d), num_stages=_NUM_STAGES
        ),
        interpret=interpret,
        name="lcx_packed_attention_fwd",
    )(sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi, q, k, v, seg, seg)


# ---------------------------------------------------------------------------- backward


def _dq_kernel(
    lo_ref, hi_ref, full_lo_ref, full_hi_ref,
    q_ref, k_ref, v_ref, q_seg_ref, seg_ref, lse_ref, delta_ref, do_ref,
    dq_ref, *count_ref,
    scale, causal, window, block_kv,
):  # fmt: skip
    """dq of one (q block, batch, head), accumulated over the row's live kv blocks."""
    i = pl.program_id(0)
    block_q, d = q_ref.shape
    q, q_seg, do = q_ref[...], q_seg_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, carry, masked):
        dq, visited = carry
        kv = pl.ds(j * block_kv, block_kv)
        k, v = k_ref[kv, :], v_ref[kv, :]
        s = plgpu.dot(q, k, trans_b=True) * (scale * _LOG2E)
        if masked:
            mask = _element_mask(
                q_seg, seg_ref[kv], i * block_q, j * block_kv, causal=causal, window=window
            )
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k), visited + 1

    sched = (lo_ref[i], hi_ref[i], full_lo_ref[i], full_hi_ref[i])
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.int32(0))
    dq, visited = _visit_blocks(*sched, body, init)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full((block_q,), visited, jnp.int32)


def _dkv_kernel(
    lo_ref, hi_ref, full_lo_ref, full_hi_ref,
    q_ref, k_ref, v_ref, seg_ref, k_seg_ref, lse_ref, delta_ref, do_ref,
    dk_ref, dv_ref, *count_ref,
    scale, causal, window, block_q,
):  # fmt: skip
    """dk, dv of one (kv block, batch, query head), accumulated over its live q blocks."""
    j = pl.program_id(0)
    block_kv, d = k_ref.shape
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]

    def body(i, carry, masked):
        dk, dv, visited = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = plgpu.dot(q, k, trans_b=True) * (scale * _LOG2E)
        if masked:
            mask = _element_mask(
                seg_ref[rows], k_seg, i * block_q, j * block_kv, causal=causal, window=window
            )
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse_ref[rows][:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv, visited + 1

    zeros = jnp.zeros((block_kv, d), jnp.float32)
    sched = (lo_ref[j], hi_ref[j], full_lo_ref[j], full_hi_ref[j])
    dk, dv, visited = _visit_blocks(*sched, body, (zeros, zeros, jnp.int32(0)))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full((block_kv,), visited, jnp.int32)


def _dq(q, k, v, seg, lse, delta, do, *, scale, causal, window, blocks, interpret, count=False):
    """dq on padded [B, T, H, D] inputs (and with `count`, kv blocks computed [B, H, T])."""
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    bq, bk = blocks
    nq = t // bq
    sched = block_schedule(seg, block_q=bq, block_kv=bk, causal=causal, window=window)
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
    kv_row = pl.BlockSpec((None, t, None, d), lambda i, b_, h: (b_, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, window=window, block_kv=bk),
        grid=(nq, b, hq),
        in_specs=[
            *_schedule_specs(nq),
            q_block, kv_row, kv_row,
            pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
            pl.BlockSpec((None, t), lambda i, b_, h: (b_, 0)),
            row_block, row_block, q_block,
        ],  # fmt: skip
        out_specs=[q_block, row_block] if count else q_block,
        out_shape=(
            [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.int32)]
            if count
            else jax.ShapeDtypeStruct(q.shape, q.dtype)
        ),
        compiler_params=plgpu.CompilerParams(
            num_warps=_num_warps(bq, bk, d), num_stages=_NUM_STAGES
        ),
        interpret=interpret,
        name="lcx_packed_attention_dq",
    )(
        sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi,
        q, k, v, seg, seg, lse, delta, do,
    )  # fmt: skip


def _dkv(q, k, v, seg, lse, delta, do, *, scale, causal, window, blocks, interpret, count=False):
    """dk, dv on padded [B, T, H, D] inputs, summed over each kv head's query group.

    With `count`, also the q blocks computed per kv block and query head, [B, H, T].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    bq, bk = blocks
    nk = t // bk
    sched = block_schedule(seg, block_q=bq, block_kv=bk, causal=causal, window=window)
    q_row = pl.BlockSpec((None, t, None, d), lambda j, b_, h: (b_, 0, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h // group, 0))
    out_block = pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h, 0))
    row = pl.BlockSpec((None, None, t), lambda j, b_, h: (b_, h, 0))
    # One kv head's gradient is the sum over its query heads: per head in f32, then summed.
    out_dtype = k.dtype if group == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((b, t, hq, d), out_dtype)] * 2
    out_specs = [out_block, out_block]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, t), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, bk), lambda j, b_, h: (b_, h, j)))
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, window=window, block_q=bq),
        grid=(nk, b, hq),
        in_specs=[
            *_schedule_specs(nk),
            q_row, kv_block, kv_block,
            pl.BlockSpec((None, t), lambda j, b_, h: (b_, 0)),
            pl.BlockSpec((None, bk), lambda j, b_, h: (b_, j)),
            row, row, q_row,
        ],  # fmt: skip
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=_num_warps(bq, bk, d), num_stages=_NUM_STAGES
        ),
        interpret=interpret,
        name="lcx_packed_attention_dkv",
    )(
        sched.q_lo, sched.q_hi, sched.q_full_lo, sched.q_full_hi,
        q, k, v, seg, seg, lse, delta, do,
    )  # fmt: skip
    dk, dv = outs[:2]
    if group > 1:
        dk = dk.reshape(b, t, hkv, group, d).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(b, t, hkv, group, d).sum(axis=3).astype(v.dtype)
    return (dk, dv, outs[2]) if count else (dk, dv)


# ------------------------------------------------------------------------ public wrapper


def _padded_head_dim(d: int) -> int:
    """Head dim Triton can tile: a power of two >= 16."""
    return max(_MIN_DIM, 1 << (d - 1).bit_length())


def packed_attention_gpu(
    q, k, v, segment_ids=None, *, causal=True, window=None, scale=None, block_sizes=None,
    interpret=False, count_blocks=False,
):  # fmt: skip
    """Packed attention through the Pallas Triton kernels; [B, T, H, D] in and out.

    Args:
      q: [B, T, Hq, D] queries.
      k, v: [B, T, Hkv, D] keys and values, Hq % Hkv == 0.
      segment_ids: int [B, T]; 0 is padding, each document one contiguous run. None
        means one document per row.
      causal, window, scale: as in `reference_attention`.
      block_sizes: a `BlockSizes` of powers of two >= 16; default DEFAULT_BLOCK_SIZES.
      interpret: run the kernels in Pallas' interpreter (CPU tests).
      count_blocks: also return int32 [B, Hq, ceil(T / block_q)], the kv blocks the
        forward kernel computed per q block (forward only, no gradient).

    Returns:
      [B, T, Hq, D] in q's dtype, exactly 0 for padding queries; with `count_blocks`,
      the pair (out, counts).
    """
    check_attention_args(q, k, v, segment_ids, window)
    block_sizes = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
    _check_block_sizes(block_sizes)
    t, d = q.shape[1], q.shape[3]
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v, seg = padded_inputs(q, k, v, segment_ids, block_sizes.multiple)
    d_pad = _padded_head_dim(d)
    # Zero columns change no logit and give zero output columns, sliced off below.
    q, k, v = (pad_length(x, d_pad, axis=3) for x in (q, k, v))
    window = None if window is None else int(window)
    if count_blocks:
        blocks = (block_sizes.block_q, block_sizes.block_kv)
        o, _, counts = _forward(
            q, k, v, seg, scale=scale, causal=causal, window=window, blocks=blocks,
            interpret=interpret, count=True,
        )  # fmt: skip
        return o[:, :t, :, :d], counts[:, :, :: blocks[0]][:, :, : -(-t // blocks[0])]
    o = _attention(q, k, v, seg, scale, bool(causal), window, block_sizes, interpret)
    return o[:, :t, :, :d]


def gpu_implementation(q, k, v, segment_ids, *, causal, window, scale, block_sizes, interpret):
    """IMPLEMENTATIONS entry; named explicitly it lowers on any host (export for CUDA).

    Raises NotImplementedError only for what the Triton kernels cannot compute: inputs
    other than float16, bfloat16 or float32 outside interpret mode.
    """
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if not interpret and not dtypes <= {jnp.dtype(t) for t in _TRITON_DTYPES}:
        raise NotImplementedError(f"pallas_gpu: Triton kernels take {_TRITON_DTYPES}; got {dtypes}")
    return packed_attention_gpu(
        q, k, v, segment_ids, causal=causal, window=window, scale=scale,
        block_sizes=block_sizes, interpret=interpret,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attention(q, k, v, seg, scale, causal, window, block_sizes, interpret):
    """Packed attention on padded [B, T, H, D] inputs, differentiable in q, k, v."""
    return _attention_fwd(q, k, v, seg, scale, causal, window, block_sizes, interpret)[0]


def _attention_fwd(q, k, v, seg, scale, causal, window, block_sizes, interpret):
    """custom_vjp forward: output and residuals (base-2 log-sum-exp)."""
    o, lse = _forward(
        q, k, v, seg, scale=scale, causal=causal, window=window,
        blocks=(block_sizes.block_q, block_sizes.block_kv), interpret=interpret,
    )  # fmt: skip
    return o, (q, k, v, seg, o, lse)


def _attention_bwd(scale, causal, window, block_sizes, interpret, residuals, do):
    """custom_vjp backward: dq, dk, dv (no gradient for segment ids)."""
    q, k, v, seg, o, lse = residuals
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    kwargs = dict(scale=scale, causal=causal, window=window, interpret=interpret)
    dq = _dq(q, k, v, seg, lse, delta, do, blocks=block_sizes.dq, **kwargs)
    dk, dv = _dkv(q, k, v, seg, lse, delta, do, blocks=block_sizes.dkv, **kwargs)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
