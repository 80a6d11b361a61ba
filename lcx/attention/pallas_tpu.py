"""Packed attention for TPU in Pallas (Mosaic), forward and backward, a grid over active blocks.

FlashAttention-2's online softmax (Dao, arXiv 2307.08691). The per-row block schedule of
`lcx.attention.layout` (Prepacking, arXiv 2404.09529; Dataset Decomposition, arXiv
2405.13226) becomes a compacted work list (`lcx.attention.step_list`): the grid is
(head, entry) with one entry per scheduled (q block, kv block) pair, scalar-prefetched
(group, block, flags) arrays drive every `index_map`, and a q block with nothing to visit
keeps one entry that writes zeros. No grid step is spent on a skipped pair. Long rows run
as windows of the list (SMEM holds one window), one dynamic-grid `pallas_call` each,
outputs aliased through the windows. Tiles inside one document, below the diagonal and
inside the window take a branch without the element mask.

Backward: a dq kernel over the same list with the dq tiles, and a dkv kernel over the
list of the transposed schedule (q blocks per kv block), wired by `lcx.attention.flash_vjp`
with the log-sum-exp saved by the forward pass.
Grouped-query heads: K/V blocks are indexed by `head // group`; dk and dv are computed
per query head and summed over the group.

Layout: the wrapper takes lcx's [B, T, H, D] and transposes to [B, H, T, D] so
Mosaic's last two block dimensions are (block, head_dim).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcx.attention.flash_vjp import flash_attention_vjp
from lcx.attention.kernel_common import (
    MASK_VALUE,
    BlockSizes,
    pad_to_blocks,
    saw_a_key,
    tile_mask,
    tile_schedule,
)
from lcx.attention.segments import Segments, segments_of
from lcx.attention.step_list import (
    COMPUTE,
    DEFAULT_CAPACITY,
    FIRST,
    FULL,
    LAST,
    StepList,
    groups_of,
    run_windows,
)

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)
_LANES = 128
_DTYPES = ("bfloat16", "float16", "float32")
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b
_ANY = pl.BlockSpec(memory_space=pl.ANY)  # an aliased output's previous value: not read


def _broadcast_lanes(x_Nx1, n):
    """A [rows, 1] column as [rows, n]."""
    return jnp.broadcast_to(x_Nx1, (x_Nx1.shape[0], n))


def _has(flags, bit):
    """Whether an entry's flags carry `bit`."""
    return (flags & bit) != 0


def _group_index(n_blocks):
    """Index-map helper: (row, block) of an entry's group, flattened as row * n + block."""

    def split(group):
        # lax.div / rem: Mosaic lowers jnp floor division through sign(), which needs a TPU.
        # int32 constants made here, not captured: index maps must not close over arrays.
        return jax.lax.div(group, jnp.int32(n_blocks)), jax.lax.rem(group, jnp.int32(n_blocks))

    return split


def _run_entry(flags, step, count_refs):
    """`step(masked=...)` on an entry that computes (unmasked on full tiles).

    In count mode (`count_refs` = blocks, steps outputs) also counts the group's computed
    blocks and grid steps, reset on its first entry.
    """
    computes, full = _has(flags, COMPUTE), _has(flags, FULL)
    pl.when(computes & full)(lambda: step(masked=False))
    pl.when(computes & ~full)(lambda: step(masked=True))
    if not count_refs:
        return
    blocks_ref, steps_ref = count_refs

    @pl.when(_has(flags, FIRST))
    def _reset():
        blocks_ref[...] = jnp.zeros(blocks_ref.shape, jnp.int32)
        steps_ref[...] = jnp.zeros(steps_ref.shape, jnp.int32)

    steps_ref[...] += 1
    blocks_ref[...] += computes.astype(jnp.int32)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    group_ref,
    block_ref,
    flags_ref,  # scalar prefetch: this window's entries
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    q_pos_ref,
    k_ids_ref,
    k_pos_ref,  # blocks
    *refs,
    scale,
    causal,
    window,
    count,
):
    """One entry (one (q block, kv block) tile, or an empty group) of the online softmax."""
    del group_ref, block_ref
    n_out = 4 if count else 2
    o_ref, lse_ref, *count_refs = refs[n_out : 2 * n_out]  # refs[:n_out]: aliased, unread
    m_sc, l_sc, acc_sc = refs[2 * n_out :]
    flags = flags_ref[pl.program_id(1)]
    block_kv = k_ref.shape[0]

    @pl.when(_has(flags, FIRST))
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            mask = tile_mask(
                q_ids_ref[...],
                k_ids_ref[...],
                q_pos_ref[...],
                k_pos_ref[...],
                causal=causal,
                window=window,
            )
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _broadcast_lanes(m_next[:, :1], block_kv))
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _broadcast_lanes(alpha[:, :1], acc_sc.shape[1]) + pv

    _run_entry(flags, step, count_refs)

    @pl.when(_has(flags, LAST))
    def _finish():
        m, l = m_sc[:, :1], l_sc[:, :1]
        seen = saw_a_key(m)
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_ref[...] = (acc_sc[...] * _broadcast_lanes(inv, acc_sc.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


class _Specs(NamedTuple):
    """BlockSpecs of one pass: q-shaped, kv-shaped, segment and per-query-row operands."""

    q: pl.BlockSpec
    kv: pl.BlockSpec
    kv_out: pl.BlockSpec
    q_seg: pl.BlockSpec
    k_seg: pl.BlockSpec
    q_row: pl.BlockSpec
    count: pl.BlockSpec

    def inputs(self, *, backward: bool):
        """Specs of q, k, v, the segment operands (and lse, delta, dO for backward)."""
        specs = [self.q, self.kv, self.kv, self.q_seg, self.q_seg, self.k_seg, self.k_seg]
        return specs + ([self.q_row, self.q_row, self.q] if backward else [])


def _specs(heads_per_kv, bq, bk, d, *, n_per_row, kv_major=False):
    """BlockSpecs of every operand, from an entry's group and block.

    The group is a q block (kv_major=False: forward, dq) or a kv block (dkv); the entry's
    block is the other side's. Groups are flattened as row * n_per_row + block.
    """
    split = _group_index(n_per_row)

    def tile(e, group_ref, block_ref):
        """(row, q block, kv block) of entry e."""
        row, own = split(group_ref[e])
        return (row, block_ref[e], own) if kv_major else (row, own, block_ref[e])

    def q_map(h, e, group_ref, block_ref, *_):
        row, i, _ = tile(e, group_ref, block_ref)
        return row, h, i, 0

    def kv_map(h, e, group_ref, block_ref, *_):
        row, _, j = tile(e, group_ref, block_ref)
        return row, jax.lax.div(h, jnp.int32(heads_per_kv)), j, 0

    def kv_out_map(h, e, group_ref, block_ref, *_):
        row, _, j = tile(e, group_ref, block_ref)
        return row, h, j, 0

    def q_seg_map(h, e, group_ref, block_ref, *_):
        row, i, _ = tile(e, group_ref, block_ref)
        return row, i, 0

    def k_seg_map(h, e, group_ref, block_ref, *_):
        row, _, j = tile(e, group_ref, block_ref)
        return row, 0, j

    def count_map(h, e, group_ref, *_):
        row, own = split(group_ref[e])
        return row, h, own, 0

    return _Specs(
        q=pl.BlockSpec((None, None, bq, d), q_map),
        kv=pl.BlockSpec((None, None, bk, d), kv_map),
        kv_out=pl.BlockSpec((None, None, bk, d), kv_out_map),
        q_seg=pl.BlockSpec((None, bq, 1), q_seg_map),
        k_seg=pl.BlockSpec((None, 1, bk), k_seg_map),
        q_row=pl.BlockSpec((None, None, bq, 1), q_map),
        count=pl.BlockSpec((None, None, 1, 1), count_map),
    )


def _segment_operands(seg: Segments):
    """q ids, q positions as [B, Tq, 1] and kv ids, kv positions as [B, 1, Tk]."""
    filled = seg.filled()
    return (
        filled.q_ids[:, :, None],
        filled.q_positions[:, :, None],
        filled.kv_ids[:, None, :],
        filled.kv_positions[:, None, :],
    )


@dataclasses.dataclass(frozen=True)
class _Pass:
    """One kernel pass over the work list: its kernel, operands, specs and scratch."""

    kernel: Callable
    operands: tuple
    in_specs: list
    out_specs: list
    scratch: list
    heads: int
    interpret: bool

    def __call__(self, steps: StepList, outs):
        """One window's pallas_call: grid (head, entry), outputs aliased to `outs`."""
        first_alias = 3 + len(self.operands)  # after the three scalar-prefetch arrays
        return pl.pallas_call(
            self.kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(self.heads, steps.length[0]),
                in_specs=[*self.in_specs, *[_ANY] * len(outs)],
                out_specs=self.out_specs,
                scratch_shapes=self.scratch,
            ),
            out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
            input_output_aliases={first_alias + n: n for n in range(len(outs))},
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            interpret=self.interpret,
        )(steps.group, steps.block, steps.flags, *self.operands, *outs)


def _forward(q, k, v, seg, *, scale, causal, window, block_sizes, interpret, capacity, count=False):
    """Pallas forward on [B, H, T, D] inputs: (o, lse [B, H, Tq, 1], blocks?, steps?)."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    bq, bk = block_sizes.block_q, block_sizes.block_kv
    nq, nk = tq // bq, tk // bk
    sched = tile_schedule(seg, bq, bk, causal=causal, window=window)
    groups = groups_of(sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi)
    spec = _specs(hq // k.shape[1], bq, bk, d, n_per_row=nq)
    outs = [jnp.zeros(q.shape, q.dtype), jnp.zeros((b, hq, tq, 1), jnp.float32)]
    out_specs = [spec.q, spec.q_row]
    if count:
        outs += [jnp.zeros((b, hq, nq, 1), jnp.int32)] * 2
        out_specs += [spec.count] * 2
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window, count=count)
    scratch = [
        pltpu.VMEM((bq, _LANES), jnp.float32),
        pltpu.VMEM((bq, _LANES), jnp.float32),
        pltpu.VMEM((bq, d), jnp.float32),
    ]
    forward = _Pass(
        kernel,
        (q, k, v, *_segment_operands(seg)),
        spec.inputs(backward=False),
        out_specs,
        scratch,
        hq,
        interpret,
    )
    return run_windows(groups, capacity, forward, outs, longest_group=nk)


# ---------------------------------------------------------------------------- backward


def _probabilities(q, k, q_ids, k_ids, q_pos, k_pos, lse, *, scale, causal, window, masked):
    """Recomputed softmax probabilities of one tile, zero where masked."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - _broadcast_lanes(lse, s.shape[1]))
    if masked:
        p = jnp.where(tile_mask(q_ids, k_ids, q_pos, k_pos, causal=causal, window=window), p, 0.0)
    return p


def _dq_kernel(
    group_ref,
    block_ref,
    flags_ref,
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
    *refs,
    scale,
    causal,
    window,
    count,
):
    """One entry of dq: a q block accumulated over its kv blocks."""
    del group_ref, block_ref
    n_out = 3 if count else 1
    dq_ref, *count_refs = refs[n_out : 2 * n_out]
    (dq_sc,) = refs[2 * n_out :]
    flags = flags_ref[pl.program_id(1)]

    @pl.when(_has(flags, FIRST))
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(
            q,
            k,
            q_ids_ref[...],
            k_ids_ref[...],
            q_pos_ref[...],
            k_pos_ref[...],
            lse_ref[...],
            scale=scale,
            causal=causal,
            window=window,
            masked=masked,
        )
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _broadcast_lanes(delta_ref[...], dp.shape[1])) * scale
        dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _run_entry(flags, step, count_refs)

    @pl.when(_has(flags, LAST))
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(
    group_ref,
    block_ref,
    flags_ref,
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
    *refs,
    scale,
    causal,
    window,
    count,
):
    """One entry of dk, dv (per query head): a kv block accumulated over its q blocks."""
    del group_ref, block_ref
    n_out = 4 if count else 2
    dk_ref, dv_ref, *count_refs = refs[n_out : 2 * n_out]
    dk_sc, dv_sc = refs[2 * n_out :]
    flags = flags_ref[pl.program_id(1)]

    @pl.when(_has(flags, FIRST))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probabilities(
            q,
            k,
            q_ids_ref[...],
            k_ids_ref[...],
            q_pos_ref[...],
            k_pos_ref[...],
            lse_ref[...],
            scale=scale,
            causal=causal,
            window=window,
            masked=masked,
        )
        dv_sc[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32
        )
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _broadcast_lanes(delta_ref[...], dp.shape[1])) * scale
        dk_sc[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32
        )

    _run_entry(flags, step, count_refs)

    @pl.when(_has(flags, LAST))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(
    q,
    k,
    v,
    seg,
    lse,
    delta,
    do,
    *,
    scale,
    causal,
    window,
    block_sizes,
    interpret,
    capacity,
    count=False,
):
    """dq, dk, dv on [B, H, T, D] inputs; lse (finite) and delta [B, H, Tq, 1].

    With `count`, also (blocks, steps) of each kernel: dq's per q block [B, H, Tq / bq] and
    dkv's per kv block [B, H, Tk / bk].
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    operands = (q, k, v, *_segment_operands(seg), lse, delta, do)
    mask = dict(scale=scale, causal=causal, window=window, count=count)
    n_counts = 2 if count else 0

    bq, bk = block_sizes.dq
    nq, nk = tq // bq, tk // bk
    sched = tile_schedule(seg, bq, bk, causal=causal, window=window)
    spec = _specs(group, bq, bk, d, n_per_row=nq)
    outs = [jnp.zeros(q.shape, q.dtype)] + [jnp.zeros((b, hq, nq, 1), jnp.int32)] * n_counts
    dq_pass = _Pass(
        functools.partial(_dq_kernel, **mask),
        operands,
        spec.inputs(backward=True),
        [spec.q] + [spec.count] * n_counts,
        [pltpu.VMEM((bq, d), jnp.float32)],
        hq,
        interpret,
    )
    groups = groups_of(sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi)
    dq_outs = run_windows(groups, capacity, dq_pass, outs, longest_group=nk)

    bq, bk = block_sizes.dkv
    nq, nk = tq // bq, tk // bk
    sched = tile_schedule(seg, bq, bk, causal=causal, window=window)
    spec = _specs(group, bq, bk, d, n_per_row=nk, kv_major=True)
    grad_dtype = k.dtype if group == 1 else jnp.float32  # summed over the group below
    outs = [jnp.zeros((b, hq, tk, d), grad_dtype)] * 2
    outs += [jnp.zeros((b, hq, nk, 1), jnp.int32)] * n_counts
    dkv_pass = _Pass(
        functools.partial(_dkv_kernel, **mask),
        operands,
        spec.inputs(backward=True),
        [spec.kv_out] * 2 + [spec.count] * n_counts,
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        hq,
        interpret,
    )
    groups = groups_of(sched.q_lo, sched.q_hi, sched.q_full_lo, sched.q_full_hi)
    dkv_outs = run_windows(groups, capacity, dkv_pass, outs, longest_group=nq)
    dq, (dk, dv) = dq_outs[0], dkv_outs[:2]
    if group > 1:
        dk = dk.reshape(b, hkv, group, tk, d).sum(axis=2)
        dv = dv.reshape(b, hkv, group, tk, d).sum(axis=2)
    dk, dv = dk.astype(k.dtype), dv.astype(v.dtype)
    if count:
        return dq, dk, dv, [c[..., 0] for c in dq_outs[1:]], [c[..., 0] for c in dkv_outs[2:]]
    return dq, dk, dv


# ------------------------------------------------------------------------- custom_vjp

# (o, lse [B, H, Tq, 1]) on padded [B, H, T, D] inputs, differentiable in q, k, v.
_attention_bhtd = flash_attention_vjp(_forward, _backward, rows_as_lse=lambda rows: rows[..., None])


# ------------------------------------------------------------------------ public wrapper


def _fit_queries(block_sizes: BlockSizes, tq: int, segments: Segments) -> BlockSizes:
    """Query blocks no longer than Tq rounded up to 8 (a few decode queries: no padding
    to 128), when queries and keys are separate rows."""
    if segments.kv_ids is None:
        return block_sizes
    fit = -(-tq // 8) * 8
    return dataclasses.replace(
        block_sizes,
        block_q=min(block_sizes.block_q, fit),
        block_q_dq=min(block_sizes.dq[0], fit),
        block_q_dkv=min(block_sizes.dkv[0], fit),
    )


def _check_tpu_block_sizes(block_sizes: BlockSizes) -> None:
    """ValueError unless every kv block fills whole lanes (the key segment ids' blocks)."""
    for name, size in [
        ("block_kv", block_sizes.block_kv),
        ("block_kv_dq", block_sizes.dq[1]),
        ("block_kv_dkv", block_sizes.dkv[1]),
    ]:
        if size % _LANES:
            raise ValueError(
                f"pallas_tpu: block_sizes.{name}={size} must be a multiple of {_LANES} on TPU"
            )


def packed_attention_tpu(
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
    capacity=DEFAULT_CAPACITY,
):
    """Packed attention through the Pallas TPU kernels; [B, T, H, D] in and out.

    Args:
      q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D].
      segments: a `Segments`; None means one document per row, self-attention.
      causal, window, scale: as in `packed_attention`.
      block_sizes: a `BlockSizes`; default DEFAULT_BLOCK_SIZES.
      interpret: run the kernels in Pallas' interpreter (CPU tests).
      count_blocks: forward only; also return blocks computed and grid steps taken per
        q block, int32 [B, Hq, ceil(Tq / block_q)] each.
      capacity: entries per window of the work list (SMEM: 12 bytes each).

    Returns:
      (out [B, Tq, Hq, D], lse [B, Tq, Hq] natural, -inf where a query saw no key),
      then (blocks, steps) with `count_blocks`.
    """
    if segments is None:
        segments = segments_of(q, k, None, None, None, None)
    tq = q.shape[1]
    block_sizes = _fit_queries(block_sizes or DEFAULT_BLOCK_SIZES, tq, segments)
    if not interpret:
        _check_tpu_block_sizes(block_sizes)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, seg = pad_to_blocks(q, k, v, segments, block_sizes.q_multiple, block_sizes.kv_multiple)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if count_blocks:
        o, lse, blocks, steps = _forward(
            q,
            k,
            v,
            seg,
            scale=scale,
            causal=causal,
            window=window,
            block_sizes=block_sizes,
            interpret=interpret,
            capacity=capacity,
            count=True,
        )
        counts = [c[..., 0][:, :, : -(-tq // block_sizes.block_q)] for c in (blocks, steps)]
        return o.transpose(0, 2, 1, 3)[:, :tq], _public_lse(lse)[:, :tq], *counts
    o, lse = _attention_bhtd(
        q,
        k,
        v,
        seg,
        scale=scale,
        causal=causal,
        window=window,
        block_sizes=block_sizes,
        interpret=interpret,
        capacity=capacity,
    )
    return o.transpose(0, 2, 1, 3)[:, :tq], _public_lse(lse)[:, :tq]


def computed_blocks(
    q,
    k,
    v,
    segments: Segments,
    *,
    causal=True,
    window=None,
    block_sizes=None,
    interpret=False,
    capacity=DEFAULT_CAPACITY,
):
    """Blocks computed and grid steps taken by each kernel: int32 [B, H, n] per pass.

    "forward", "dq": kv blocks per q block; "dkv": q blocks per kv block; each with a
    "_steps" twin counting grid steps (an empty group takes one).
    """
    block_sizes = block_sizes or DEFAULT_BLOCK_SIZES
    _, _, blocks, steps = packed_attention_tpu(
        q,
        k,
        v,
        segments,
        causal=causal,
        window=window,
        block_sizes=block_sizes,
        interpret=interpret,
        count_blocks=True,
        capacity=capacity,
    )
    qp, kp, vp, seg = pad_to_blocks(
        q, k, v, segments, block_sizes.q_multiple, block_sizes.kv_multiple
    )
    qp, kp, vp = (x.transpose(0, 2, 1, 3) for x in (qp, kp, vp))
    zeros = jnp.zeros((*qp.shape[:3], 1), jnp.float32)
    *_, (dq, dq_steps), (dkv, dkv_steps) = _backward(
        qp,
        kp,
        vp,
        seg,
        zeros,
        zeros,
        qp,
        scale=1.0,
        causal=causal,
        window=window,
        block_sizes=block_sizes,
        interpret=interpret,
        capacity=capacity,
        count=True,
    )
    return {
        "forward": blocks,
        "forward_steps": steps,
        "dq": dq,
        "dq_steps": dq_steps,
        "dkv": dkv,
        "dkv_steps": dkv_steps,
    }


def _public_lse(lse_BxHxTx1):
    """The kernels' [B, H, T, 1] lse as [B, T, H]."""
    return jnp.swapaxes(lse_BxHxTx1[..., 0], 1, 2)


def tpu_implementation(q, k, v, segments, *, causal, window, scale, block_sizes, interpret):
    """IMPLEMENTATIONS entry; named explicitly it runs on any backend (to export for TPU).

    Raises NotImplementedError for inputs other than bfloat16, float16 or float32 (the
    accumulators are float32; TPUs have no float64).
    """
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if not dtypes <= {jnp.dtype(t) for t in _DTYPES}:
        raise NotImplementedError(f"pallas_tpu: the kernels take {_DTYPES}; got {dtypes}")
    return packed_attention_tpu(
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
