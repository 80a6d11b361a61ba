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
a loop over the transposed schedule's q blocks), wired by `lcx.attention.flash_vjp` with
the log-sum-exp saved by the forward pass (the base-2 lse's cotangent enters delta divided
by ln 2). Grouped-query heads: K/V are indexed by `head // group`; dk and dv are computed
per query head and summed over the group in the wrapper.

Queries and keys may differ in length and carry their own segment ids and positions
(the `packed_attention` contract); the element mask compares positions, and the kv loop
bounds come from the general `block_schedule`.

Logits are kept in base 2 (`exp2`, scale folded with log2(e)), as Triton likes it; the
saved log-sum-exp is base 2 inside this module and natural outside it.

JAX 0.11 deprecated the Pallas Triton backend. Where `jax.experimental.pallas.triton`
cannot be imported, this module still imports and `gpu_implementation` warns once per
process and raises NotImplementedError, so the dispatcher falls back to `xla_chunked`.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcx.attention.flash_vjp import flash_attention_vjp
from lcx.attention.kernel_common import (
    MASK_VALUE,
    BlockSizes,
    natural_lse,
    pad_length,
    pad_to_blocks,
    saw_a_key,
    tile_mask,
    tile_schedule,
    visit_blocks,
)
from lcx.attention.segments import Segments, segments_of

_triton_missing = "jax.experimental.pallas.triton is not available"  # why plgpu is None
try:  # deprecated in JAX 0.11; gone in some later release
    from jax.experimental.pallas import triton as plgpu
except ImportError as error:  # pragma: no cover - depends on the installed JAX
    plgpu, _triton_missing = None, f"{_triton_missing}: {error!r}"
if plgpu is not None and not all(hasattr(plgpu, n) for n in ("dot", "CompilerParams")):
    plgpu = None  # pragma: no cover - a backend without what these kernels use
    _triton_missing = "jax.experimental.pallas.triton lacks dot or CompilerParams"
_warned_unavailable = False  # one warning per process, not one per traced layer

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


def _dot(a, b, trans_a=False, trans_b=False):
    """`plgpu.dot` at the operands' precision: IEEE for float32 (Triton's default for a
    float32 dot is TF32, about 3e-4 relative error), tensor cores for 16-bit operands."""
    ieee = jnp.float32 in (jnp.dtype(a.dtype), jnp.dtype(b.dtype))
    precision = jax.lax.Precision.HIGHEST if ieee else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _mask(q_ids, k_ids, q_pos, k_pos, *, causal, window):
    """Visibility of a (q block [Q], kv block [S]) tile."""
    return tile_mask(
        q_ids[:, None],
        k_ids[None, :],
        q_pos[:, None],
        k_pos[None, :],
        causal=causal,
        window=window,
    )


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    lo_ref,
    hi_ref,
    full_lo_ref,
    full_hi_ref,  # schedule row [nq]
    q_ref,
    k_ref,
    v_ref,  # q block, full K/V row
    q_ids_ref,
    q_pos_ref,
    k_ids_ref,
    k_pos_ref,  # q block's and whole row's segments
    o_ref,
    lse_ref,
    *count_ref,  # outputs
    scale,
    causal,
    window,
    block_kv,
):
    """Online softmax of one (q block, batch, head) over the row's live kv blocks."""
    i = pl.program_id(0)
    block_q, d = q_ref.shape
    q, q_ids, q_pos = q_ref[...], q_ids_ref[...], q_pos_ref[...]

    def body(j, carry, masked):
        acc, m_prev, l_prev, visited = carry
        kv = pl.ds(j * block_kv, block_kv)
        s = _dot(q, k_ref[kv, :], trans_b=True) * (scale * _LOG2E)
        if masked:
            mask = _mask(q_ids, k_ids_ref[kv], q_pos, k_pos_ref[kv], causal=causal, window=window)
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        v = v_ref[kv, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1), visited + 1

    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.int32(0),
    )
    sched = (lo_ref[i], hi_ref[i], full_lo_ref[i], full_hi_ref[i])
    acc, m, l, visited = visit_blocks(*sched, body, init)
    # Queries that saw no key: exactly 0 out and lse -inf (their masked p were junk).
    seen = saw_a_key(m)
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), -jnp.inf)
    if count_ref:
        count_ref[0][...] = jnp.full((block_q,), visited, jnp.int32)


def _schedule_specs(n_blocks):
    """BlockSpecs of the four [B, n_blocks] schedule arrays: this program's batch row."""
    return [pl.BlockSpec((None, n_blocks), lambda _, b_, h: (b_, 0))] * 4


def _segment_specs(block_q, tk, q_block_index):
    """BlockSpecs of q ids, q positions (one block) and kv ids, kv positions (the row)."""
    q_block = pl.BlockSpec((None, block_q), q_block_index)
    row = pl.BlockSpec((None, tk), lambda _, b_, h: (b_, 0))
    return [q_block, q_block, row, row]


def _compiler_params(block_a, block_b, d):
    """Triton launch settings of one kernel."""
    return plgpu.CompilerParams(num_warps=_num_warps(block_a, block_b, d), num_stages=_NUM_STAGES)


def _forward(q, k, v, seg, *, scale, causal, window, block_sizes, interpret, count=False):
    """Pallas forward on padded [B, T, H, D]; returns (o, lse2 [B, Hq, Tq], counts?)."""
    b, tq, hq, d = q.shape
    tk, group = k.shape[1], hq // k.shape[2]
    bq, bk = blocks = block_sizes.block_q, block_sizes.block_kv
    nq = tq // bq
    sched = tile_schedule(seg, *blocks, causal=causal, window=window)
    filled = seg.filled()
    row_block = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, hq, tq), jnp.float32),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)), row_block]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, tq), jnp.int32))
        out_specs.append(row_block)
    kv_row = pl.BlockSpec((None, tk, None, d), lambda i, b_, h: (b_, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window, block_kv=bk),
        grid=(nq, b, hq),
        in_specs=[
            *_schedule_specs(nq),
            pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
            kv_row,
            kv_row,
            *_segment_specs(bq, tk, lambda i, b_, h: (b_, i)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(bq, bk, d),
        interpret=interpret,
        name="lcx_packed_attention_fwd",
    )(
        sched.kv_lo,
        sched.kv_hi,
        sched.kv_full_lo,
        sched.kv_full_hi,
        q,
        k,
        v,
        filled.q_ids,
        filled.q_positions,
        filled.kv_ids,
        filled.kv_positions,
    )


# ---------------------------------------------------------------------------- backward


def _dq_kernel(
    lo_ref,
    hi_ref,
    full_lo_ref,
    full_hi_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    q_pos_ref,
    k_ids_ref,
    k_pos_ref,
    lse_ref,
    delta_ref,
    do_ref,
    dq_ref,
    *count_ref,
    scale,
    causal,
    window,
    block_kv,
):
    """dq of one (q block, batch, head), accumulated over the row's live kv blocks."""
    i = pl.program_id(0)
    block_q, d = q_ref.shape
    q, q_ids, q_pos, do = q_ref[...], q_ids_ref[...], q_pos_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, carry, masked):
        dq, visited = carry
        kv = pl.ds(j * block_kv, block_kv)
        k, v = k_ref[kv, :], v_ref[kv, :]
        s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
        if masked:
            mask = _mask(q_ids, k_ids_ref[kv], q_pos, k_pos_ref[kv], causal=causal, window=window)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k), visited + 1

    sched = (lo_ref[i], hi_ref[i], full_lo_ref[i], full_hi_ref[i])
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.int32(0))
    dq, visited = visit_blocks(*sched, body, init)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full((block_q,), visited, jnp.int32)


def _dkv_kernel(
    lo_ref,
    hi_ref,
    full_lo_ref,
    full_hi_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    q_pos_ref,
    k_ids_ref,
    k_pos_ref,
    lse_ref,
    delta_ref,
    do_ref,
    dk_ref,
    dv_ref,
    *count_ref,
    scale,
    causal,
    window,
    block_q,
):
    """dk, dv of one (kv block, batch, query head), accumulated over its live q blocks."""
    j = pl.program_id(0)
    block_kv, d = k_ref.shape
    k, v, k_ids, k_pos = k_ref[...], v_ref[...], k_ids_ref[...], k_pos_ref[...]

    def body(i, carry, masked):
        dk, dv, visited = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
        if masked:
            mask = _mask(
                q_ids_ref[rows], k_ids, q_pos_ref[rows], k_pos, causal=causal, window=window
            )
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse_ref[rows][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv, visited + 1

    zeros = jnp.zeros((block_kv, d), jnp.float32)
    sched = (lo_ref[j], hi_ref[j], full_lo_ref[j], full_hi_ref[j])
    dk, dv, visited = visit_blocks(*sched, body, (zeros, zeros, jnp.int32(0)))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full((block_kv,), visited, jnp.int32)


def _dq(q, k, v, seg, lse, delta, do, *, scale, causal, window, blocks, interpret, count=False):
    """dq on padded [B, T, H, D] inputs (and with `count`, kv blocks computed [B, H, Tq])."""
    b, tq, hq, d = q.shape
    tk, group = k.shape[1], hq // k.shape[2]
    bq, bk = blocks
    nq = tq // bq
    sched = tile_schedule(seg, *blocks, causal=causal, window=window)
    filled = seg.filled()
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
    kv_row = pl.BlockSpec((None, tk, None, d), lambda i, b_, h: (b_, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, window=window, block_kv=bk),
        grid=(nq, b, hq),
        in_specs=[
            *_schedule_specs(nq),
            q_block,
            kv_row,
            kv_row,
            *_segment_specs(bq, tk, lambda i, b_, h: (b_, i)),
            row_block,
            row_block,
            q_block,
        ],
        out_specs=[q_block, row_block] if count else q_block,
        out_shape=(
            [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tq), jnp.int32)]
            if count
            else jax.ShapeDtypeStruct(q.shape, q.dtype)
        ),
        compiler_params=_compiler_params(bq, bk, d),
        interpret=interpret,
        name="lcx_packed_attention_dq",
    )(
        sched.kv_lo,
        sched.kv_hi,
        sched.kv_full_lo,
        sched.kv_full_hi,
        q,
        k,
        v,
        filled.q_ids,
        filled.q_positions,
        filled.kv_ids,
        filled.kv_positions,
        lse,
        delta,
        do,
    )


def _dkv(q, k, v, seg, lse, delta, do, *, scale, causal, window, blocks, interpret, count=False):
    """dk, dv on padded [B, T, H, D] inputs, summed over each kv head's query group.

    With `count`, also the q blocks computed per kv block and query head, [B, H, Tk].
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bq, bk = blocks
    nk = tk // bk
    sched = tile_schedule(seg, *blocks, causal=causal, window=window)
    filled = seg.filled()
    q_row = pl.BlockSpec((None, tq, None, d), lambda j, b_, h: (b_, 0, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h // group, 0))
    out_block = pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h, 0))
    row = pl.BlockSpec((None, None, tq), lambda j, b_, h: (b_, h, 0))
    q_seg_row = pl.BlockSpec((None, tq), lambda j, b_, h: (b_, 0))
    k_seg_block = pl.BlockSpec((None, bk), lambda j, b_, h: (b_, j))
    # One kv head's gradient is the sum over its query heads: per head in f32, then summed.
    out_dtype = k.dtype if group == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((b, tk, hq, d), out_dtype)] * 2
    out_specs = [out_block, out_block]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, tk), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, bk), lambda j, b_, h: (b_, h, j)))
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, window=window, block_q=bq),
        grid=(nk, b, hq),
        in_specs=[
            *_schedule_specs(nk),
            q_row,
            kv_block,
            kv_block,
            q_seg_row,
            q_seg_row,
            k_seg_block,
            k_seg_block,
            row,
            row,
            q_row,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(bq, bk, d),
        interpret=interpret,
        name="lcx_packed_attention_dkv",
    )(
        sched.q_lo,
        sched.q_hi,
        sched.q_full_lo,
        sched.q_full_hi,
        q,
        k,
        v,
        filled.q_ids,
        filled.q_positions,
        filled.kv_ids,
        filled.kv_positions,
        lse,
        delta,
        do,
    )
    dk, dv = outs[:2]
    if group > 1:
        dk = dk.reshape(b, tk, hkv, group, d).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(b, tk, hkv, group, d).sum(axis=3).astype(v.dtype)
    return (dk, dv, outs[2]) if count else (dk, dv)


def _backward(q, k, v, seg, lse2, delta, do, *, scale, causal, window, block_sizes, interpret):
    """dq, dk, dv on padded [B, T, H, D] inputs; lse2 and delta [B, Hq, Tq], base 2."""
    kwargs = dict(scale=scale, causal=causal, window=window, interpret=interpret)
    dq = _dq(q, k, v, seg, lse2, delta, do, blocks=block_sizes.dq, **kwargs)
    dk, dv = _dkv(q, k, v, seg, lse2, delta, do, blocks=block_sizes.dkv, **kwargs)
    return dq, dk, dv


# ------------------------------------------------------------------------- custom_vjp

# (out, base-2 lse [B, Hq, Tq]) on padded inputs, differentiable in q, k, v.
_attention = flash_attention_vjp(
    _forward, _backward, rows_as_lse=lambda rows: jnp.swapaxes(rows, 1, 2), lse_base2=True
)


# ------------------------------------------------------------------------ public wrapper


def _padded_head_dim(d: int) -> int:
    """Head dim Triton can tile: a power of two >= 16."""
    return max(_MIN_DIM, 1 << (d - 1).bit_length())


def packed_attention_gpu(
    q,
    k,
    v,
    segments: Segments | None = None,
    *,
    causal=True,
    window=None,
    scale=None,
    block_sizes=None,
    interpret=False,
    count_blocks=False,
):
    """Packed attention through the Pallas Triton kernels; [B, T, H, D] in and out.

    Args:
      q: [B, Tq, Hq, D] queries.
      k, v: [B, Tk, Hkv, D] keys and values, Hq % Hkv == 0.
      segments: a `Segments` (ids and positions of both sides); None means one
        document per row, self-attention.
      causal, window, scale: as in `packed_attention`.
      block_sizes: a `BlockSizes` of powers of two >= 16; default DEFAULT_BLOCK_SIZES.
      interpret: run the kernels in Pallas' interpreter (CPU tests).
      count_blocks: also return int32 [B, Hq, ceil(Tq / block_q)], the kv blocks the
        forward kernel computed per q block (forward only, no gradient).

    Returns:
      (out [B, Tq, Hq, D], lse [B, Tq, Hq] natural, -inf where a query saw no key);
      with `count_blocks`, (out, lse, counts).
    """
    if plgpu is None:
        raise NotImplementedError(f"pallas_gpu: {_triton_missing}")
    if segments is None:
        segments = segments_of(q, k, None, None, None, None)
    block_sizes = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
    _check_block_sizes(block_sizes)
    tq, d = q.shape[1], q.shape[3]
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v, seg = pad_to_blocks(q, k, v, segments, block_sizes.q_multiple, block_sizes.kv_multiple)
    d_pad = _padded_head_dim(d)
    # Zero columns change no logit and give zero output columns, sliced off below.
    q, k, v = (pad_length(x, d_pad, axis=3) for x in (q, k, v))
    if count_blocks:
        o, lse2, counts = _forward(
            q,
            k,
            v,
            seg,
            scale=scale,
            causal=causal,
            window=window,
            block_sizes=block_sizes,
            interpret=interpret,
            count=True,
        )
        bq = block_sizes.block_q
        counts = counts[:, :, ::bq][:, :, : -(-tq // bq)]
        return o[:, :tq, :, :d], _public_lse(lse2)[:, :tq], counts
    o, lse2 = _attention(
        q,
        k,
        v,
        seg,
        scale=scale,
        causal=bool(causal),
        window=window,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    return o[:, :tq, :, :d], _public_lse(lse2)[:, :tq]


def computed_blocks(
    q, k, v, segments: Segments, *, causal=True, window=None, block_sizes=None, interpret=False
):
    """Blocks each kernel computes: int32 [B, H, n] per pass.

    "forward", "dq": kv blocks per q block; "dkv": q blocks per kv block.
    """
    block_sizes = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
    _, _, forward = packed_attention_gpu(
        q,
        k,
        v,
        segments,
        causal=causal,
        window=window,
        block_sizes=block_sizes,
        interpret=interpret,
        count_blocks=True,
    )
    qp, kp, vp, seg = pad_to_blocks(
        q, k, v, segments, block_sizes.q_multiple, block_sizes.kv_multiple
    )
    lse = jnp.zeros((qp.shape[0], qp.shape[2], qp.shape[1]), jnp.float32)
    kwargs = dict(scale=1.0, causal=causal, window=window, interpret=interpret, count=True)
    _, dq = _dq(qp, kp, vp, seg, lse, lse, qp, blocks=block_sizes.dq, **kwargs)
    *_, dkv = _dkv(qp, kp, vp, seg, lse, lse, qp, blocks=block_sizes.dkv, **kwargs)
    # The kernels write their count on every row of the block: one per block.
    return {
        "forward": forward,
        "dq": dq[:, :, :: block_sizes.dq[0]],
        "dkv": dkv[:, :, :: block_sizes.dkv[1]],
    }


def _public_lse(lse2_BxHxT):
    """Base-2 [B, H, T] log-sum-exp as the natural [B, T, H] one (-inf stays -inf)."""
    return natural_lse(jnp.swapaxes(lse2_BxHxT, 1, 2), True, base2=True)


def _warn_unavailable():
    """Say once per process that pallas_gpu cannot run, so a fallback is never silent."""
    global _warned_unavailable
    if not _warned_unavailable:
        _warned_unavailable = True
        warnings.warn(
            f"pallas_gpu is unavailable ({_triton_missing}); packed_attention falls back to "
            "xla_chunked",
            UserWarning,
            stacklevel=3,  # the caller of gpu_implementation
        )


def gpu_implementation(q, k, v, segments, *, causal, window, scale, block_sizes, interpret):
    """IMPLEMENTATIONS entry; named explicitly it lowers on any host (export for CUDA).

    Raises NotImplementedError for what the Triton kernels cannot compute: inputs other
    than float16, bfloat16 or float32 (the accumulators are float32), or a JAX without
    the Pallas Triton backend.
    """
    if plgpu is None:
        _warn_unavailable()
        raise NotImplementedError(f"pallas_gpu: {_triton_missing}")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if not dtypes <= {jnp.dtype(t) for t in _TRITON_DTYPES}:  # float32 accumulators
        raise NotImplementedError(f"pallas_gpu: Triton kernels take {_TRITON_DTYPES}; got {dtypes}")
    return packed_attention_gpu(
        q,
        k,
        v,
        segments,
        causal=causal,
        window=window,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )
