"""Ragged paged attention for TPU in Pallas (Mosaic): the serving engine's paged read.

The work-list layout of Ragged Paged Attention (tpu-inference, the vLLM TPU backend's
`ragged_paged_attention` kernel) over the page pool of PagedAttention (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention",
SOSP 2023, arXiv 2309.06180), with FlashAttention's online softmax (Dao et al.,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022,
arXiv 2205.14135) across a group's pages.

The grid is one step per run of up to `pages_per_step` consecutive pages of one query
group (`step_pages`: a group of n pages takes ceil(n / pages_per_step) steps), so a
step's fixed cost (about 0.35 us on TPU) is spread over `KEYS_PER_STEP` keys instead of
one page's, as tpu-inference's kernel takes several pages per step. Scalar-prefetched
arrays name each step's group, its pages' physical indices (looked up in the page table
before the call), its first key position and how many of its keys are real, and drive the
`index_map`s: the q block is the step's group, and each of the step's pages is its own
k and v operand (the same pool, `pages_per_step` times), read straight from the pool in
HBM (no gather in XLA); a step's pages are joined in VMEM into one [pages * P, D] block
per kv head. The output block is the step's group, so a group's steps (consecutive)
accumulate (m, l, acc) in VMEM and are written once, at the group's last step. Where a
step has fewer pages than operands, the spare operands keep the page they had the step
before, so they fetch nothing new (and their keys are masked). The grid's extent is
dynamic, the list's real steps, so the list's padding (a fixed-size list built in the
step, `ragged_paged_xla.work_in_graph`) costs no grid step; with no real step, one runs,
naming the dummy group G, whose results are dropped. A group with no pages keeps the
zeros (and -inf lse) its aliased outputs start with. A step list too long for SMEM
(`STEP_LIST_BYTES`; e.g. 128 slots x 32K tokens of 16-token pages) runs in a loop over
windows of whole groups' steps, one call each, the outputs aliased through them, as the
training kernels' lists do (`lcx.attention.step_list`); only the real steps' windows run.

Layout: the pool [N, P, K, D] is read as [N, P, K * D] (a free reshape), whole pages,
and each kv head's keys are a lane-aligned slice of a page (several pages per step need
P a multiple of 16, whole bfloat16 sublane tiles). The queries of a group are arranged
[K, Q, D] (head h = k * R + r on row c * R + r, Q = C * R padded to 16 rows,
`lcx.attention.ragged_paged_common`), so each kv head is one [Q, D] x [D, pages * P]
product. Heads narrower than a lane tile (D dividing 128 with K * D a multiple of 128:
8 kv heads of 64 in Llama 3.2 1B, 2 in Qwen2.5 0.5B and lm_tiny) cannot be sliced one
by one; each kv head reads the whole 128-lane tile holding it (`lane_span`; a tile's
pages are joined once for the heads in it) with its queries at its own lanes and zeros
on the others', so the product over the tile is its own (the MXU runs a 64-deep
product as a 128-deep one anyway), and its output is its own lanes of the tile's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcx.attention.kernel_common import MASK_VALUE, products_precision
from lcx.attention.ragged_paged_common import by_kv_head, check_inputs, from_kv_heads, per_row

NAME = "ragged_paged_attention_tpu"
# Keys a grid step reads (whole pages; 512 at pages of 16 is 32 pages a step), within
# PAGE_BUFFER_BYTES of VMEM for the pages' double-buffered keys and values (Mosaic's
# default scoped VMEM is 16 MiB on v5e, 32 MiB on v6e).
KEYS_PER_STEP = 512
PAGE_BUFFER_BYTES = 4 << 20
# A page whose double-buffered keys and values alone pass this takes the XLA read
# (NotImplementedError): half of v5e's default scoped VMEM, the rest for q, acc, scores.
ONE_PAGE_LIMIT_BYTES = 8 << 20
# The prefetched step arrays live in SMEM (1 MiB per core on v4 to v6e, shared with
# Mosaic's own scalars); a longer list runs as several calls, each on a window of whole
# groups' steps whose arrays fit this (`window_end`), as the training kernels' lists do
# (`lcx.attention.step_list`).
STEP_LIST_BYTES = 512 << 10
_LANES = 128
_SUBLANES = 16  # q rows padded to whole (bfloat16-packed) sublane tiles; pages joined too
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_ANY = pl.BlockSpec(memory_space=pl.ANY)  # an aliased output's first value: not read


class StepPages(NamedTuple):
    """The kernel's grid, one entry per step, int32: group [T] (G: padding), physical
    [T * pages_per_step] (step t's pages at t * pages_per_step onwards), start [T] (its
    first key's position) and keys [T] (how many of its keys are real)."""

    group: jax.Array
    physical: jax.Array
    start: jax.Array
    keys: jax.Array


def pages_per_step(page_size: int, page_bytes: int = 0, interpret: bool = False) -> int:
    """How many pages a grid step reads: `KEYS_PER_STEP` worth, fewer where their
    double-buffered keys and values (`page_bytes` each, k or v) would pass
    `PAGE_BUFFER_BYTES`, and 1 where pages are not whole sublane tiles (they are joined on
    sublanes; the interpreter joins any)."""
    if page_size % _SUBLANES and not interpret:
        return 1
    return max(1, min(KEYS_PER_STEP // page_size, PAGE_BUFFER_BYTES // max(4 * page_bytes, 1)))


def step_pages(group_W, page_W, slot_G, table, offset_S, page_size, per_step):
    """(StepPages, grid extent): the grid steps of a work list (a group, a logical page of
    its slot; group-major, each group's pages consecutive and ascending, padding items
    naming group G last): runs of up to `per_step` pages of one group, in arrays of
    T = min(W, ceil(W / per_step) + G) steps (enough for any split of W items among G
    groups), padding steps last. The extent, int32 [], counts the real steps (at least
    one: with none, one padding step), so padding steps are never run.

    A step's spare places (past its real pages) keep the physical page their place had
    the step before (the first step's, at step 0), so the kernel fetches a page only for
    a real one: fetches <= real items + per_step per call (per window of a long list).
    """
    g, w = slot_G.shape[0], group_W.shape[0]
    per_slot = table.shape[1]
    real_W = group_W < g
    count_G = jax.ops.segment_sum(real_W.astype(jnp.int32), jnp.minimum(group_W, g), g + 1)[:g]
    first_item_G = jnp.cumsum(count_G) - count_G
    first_page_G = page_W[jnp.clip(first_item_G, 0, w - 1)]
    steps_G = -(-count_G // per_step)
    end_G = jnp.cumsum(steps_G)
    t = jnp.arange(min(w, -(-w // per_step) + g), dtype=jnp.int32)
    group_T = jnp.searchsorted(end_G, t, side="right").astype(jnp.int32)  # G past the end
    at_T = jnp.minimum(group_T, g - 1)
    first_T = first_page_G[at_T] + (t - (end_G - steps_G)[at_T]) * per_step
    pages_T = jnp.clip(first_page_G[at_T] + count_G[at_T] - first_T, 0, per_step)
    pages_T = jnp.where(group_T < g, pages_T, 0)
    place = jnp.arange(per_step, dtype=jnp.int32)
    logical_TxM = jnp.clip(first_T[:, None] + place, 0, per_slot - 1)
    physical_TxM = table[slot_G[at_T][:, None], logical_TxM]
    real_TxM = place < pages_T[:, None]
    # Each place's last real step so far: its page is kept through the steps after it.
    last_TxM = jax.lax.cummax(jnp.where(real_TxM, t[:, None], -1), axis=0)
    kept = physical_TxM[jnp.maximum(last_TxM, 0), place]
    physical_TxM = jnp.where(last_TxM >= 0, kept, physical_TxM[0, 0])
    start_T = offset_S[slot_G[at_T]] + first_T * page_size
    steps = StepPages(
        group_T,
        physical_TxM.reshape(-1).astype(jnp.int32),
        start_T.astype(jnp.int32),
        (pages_T * page_size).astype(jnp.int32),
    )
    return steps, jnp.maximum(end_G[-1], 1).astype(jnp.int32)


def _kernel(
    group_ref,
    physical_ref,
    start_ref,
    keys_ref,  # scalar prefetch: StepPages
    q_ref,
    pos_ref,
    real_ref,  # blocks
    *refs,  # the step's pages' keys, then their values; the aliased outputs (unread),
    # the outputs, the scratch
    groups,
    window,
    precision,
    per_step,
    head_dim,
):
    """One step: a group's queries against its next pages, folded into the running
    softmax. Each kv head's q, output and accumulator blocks are its lane span (the
    head's own lanes, or the lane tile holding it: `lane_span`)."""
    del physical_ref
    k_refs, v_refs = refs[:per_step], refs[per_step : 2 * per_step]
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[2 * per_step + 2 :]
    t, n = pl.program_id(0), pl.num_programs(0)
    group = group_ref[t]
    first = (t == 0) | (group_ref[jnp.maximum(t - 1, 0)] != group)
    last = (t == n - 1) | (group_ref[jnp.minimum(t + 1, n - 1)] != group)
    kv_heads, rows, span = q_ref.shape
    size = k_refs[0].shape[0] * per_step

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(group < groups)
    def _compute():
        # int32 tiles, broadcast before comparing: no [rows, 1] boolean is broadcast.
        key = jax.lax.broadcasted_iota(jnp.int32, (rows, size), 1)
        kv_pos = start_ref[t] + key
        q_pos = jnp.broadcast_to(pos_ref[...], (rows, size))
        real = jnp.broadcast_to(real_ref[...], (rows, size)) != 0
        visible = (kv_pos <= q_pos) & real & (key < keys_ref[t])
        if window is not None:
            visible &= q_pos - kv_pos < window

        def joined(page_refs, lo):
            """Lanes [lo, lo + span) of the step's pages, [pages * P, span]."""
            parts = [r[:, lo : lo + span] for r in page_refs]
            return parts[0] if per_step == 1 else jnp.concatenate(parts, axis=0)

        tiles = {}  # lane span start: its keys and values, joined once for its heads
        for kv in range(kv_heads):
            q = q_ref[kv]
            lo = kv * head_dim // span * span
            if lo not in tiles:
                tiles[lo] = (joined(k_refs, lo).astype(q.dtype), joined(v_refs, lo))
            k, v = tiles[lo]
            s = jax.lax.dot_general(
                q, k, _NT, preferred_element_type=jnp.float32, precision=precision
            )
            s = jnp.where(visible, s * head_dim**-0.5, MASK_VALUE)
            m_prev = m_sc[kv]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(visible, jnp.exp(s - jnp.broadcast_to(m_next[:, :1], s.shape)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_sc[kv] = alpha * l_sc[kv] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[kv] = m_next
            pv = jax.lax.dot(
                p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision
            )
            acc_sc[kv] = acc_sc[kv] * jnp.broadcast_to(alpha[:, :1], (rows, span)) + pv

    @pl.when(last)
    def _finish():
        for kv in range(kv_heads):
            m, l = m_sc[kv][:, :1], l_sc[kv][:, :1]
            seen = l > 0
            safe = jnp.where(seen, l, 1.0)
            out = acc_sc[kv] / jnp.broadcast_to(safe, (rows, span))
            o_ref[kv] = jnp.where(seen, out, 0.0).astype(o_ref.dtype)
            lse_ref[kv] = jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def lane_span(head_dim: int, kv_heads: int) -> int | None:
    """The lanes of a page the kernel reads for each kv head: its own `head_dim` where
    that slice is lane-aligned (or the page has one head); the `_LANES` tile holding it
    where heads are narrower and tile the page (`head_dim` divides `_LANES`, and
    `_LANES` divides `kv_heads * head_dim`); None where neither holds."""
    if kv_heads == 1 or head_dim % _LANES == 0:
        return head_dim
    if _LANES % head_dim == 0 and kv_heads * head_dim % _LANES == 0:
        return _LANES
    return None


def _span(q_GxCxHxD, cache, interpret) -> int:
    """`lane_span` of these heads; NotImplementedError where there is none (Pallas'
    interpreter slices any lanes: there, each head's own)."""
    d, kv_heads = q_GxCxHxD.shape[3], cache.k.shape[2]
    span = lane_span(d, kv_heads)
    if span is None and not interpret:
        raise NotImplementedError(
            f"pallas_tpu: with several kv heads the kernel slices pages by head on lanes; "
            f"head_dim={d} must be a multiple of {_LANES}, or divide it with "
            f"kv_heads * head_dim ({kv_heads * d}) a multiple of it"
        )
    return d if span is None else span


def _own_lanes(x_GxKxQxD, span):
    """[G, K, Q, span]: each kv head's D lanes at its place in its lane tile (k * D mod
    span), zeros elsewhere; x itself where span is D."""
    d = x_GxKxQxD.shape[3]
    if span == d:
        return x_GxKxQxD
    heads = [
        jnp.pad(x_GxKxQxD[:, kv], ((0, 0), (0, 0), (kv * d % span, span - kv * d % span - d)))
        for kv in range(x_GxKxQxD.shape[1])
    ]
    return jnp.stack(heads, axis=1)


def _from_own_lanes(x_GxKxQxS, d):
    """_own_lanes' inverse: each kv head's D lanes of its tile, [G, K, Q, D]."""
    span = x_GxKxQxS.shape[3]
    if span == d:
        return x_GxKxQxS
    heads = [
        x_GxKxQxS[:, kv, :, kv * d % span : kv * d % span + d] for kv in range(x_GxKxQxS.shape[1])
    ]
    return jnp.stack(heads, axis=1)


def window_steps(per_step: int) -> int:
    """Steps a window of the step list holds: their int32 arrays (group, start, keys and
    `per_step` pages each) within STEP_LIST_BYTES."""
    return STEP_LIST_BYTES // (4 * (3 + per_step))


def last_group_ends(group_T):
    """int32 [T]: at each step t, the last end of a group (a step index + 1) <= t + 1."""
    t = jnp.arange(group_T.shape[0], dtype=jnp.int32)
    ends = jnp.concatenate([group_T[1:] != group_T[:-1], jnp.ones((1,), bool)])
    return jax.lax.cummax(jnp.where(ends, t + 1, 0))


def window_end(last_end_T, lo, size, extent):
    """The end of the window of steps from `lo`: its last group end within `size` steps
    (`last_group_ends`; a window never cuts a group, whose first and last steps write its
    output), at most the list's `extent`, at least one step on."""
    end = last_end_T[jnp.minimum(lo + size, last_end_T.shape[0]) - 1]
    # `lo + 1` only where a group has more than `size` steps, which the kernel refuses
    # before its loop (and the list's one padding step, with no real steps).
    return jnp.maximum(jnp.minimum(end, extent), lo + 1)


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
      group_W, page_W: the work items (a group, a logical page of its slot), group-major,
        each group's pages consecutive and ascending; padding items name group G. The
        kernel runs them `pages_per_step` at a time (`step_pages`).
      cache: anything with `k` and `v`, [num_pages, page_size, K, D] each (a
        `PagedAttentionCache`); table: [slots, pages per slot] physical pages;
        offset_S: each slot's first position; window: None or a sliding window.
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Returns:
      out in q's dtype, 0 where a query saw no key; lse float32, natural, -inf there.
    """
    check_inputs(NAME, q_GxCxHxD, real_GxC, positions_GxC, group_W, page_W, cache)
    span = _span(q_GxCxHxD, cache, interpret)
    g, c, h, d = q_GxCxHxD.shape
    n, size, kv_heads, _ = cache.k.shape
    r = h // kv_heads
    rows = -(-c * r // _SUBLANES) * _SUBLANES
    page_bytes = size * kv_heads * d * cache.k.dtype.itemsize
    if 4 * page_bytes > ONE_PAGE_LIMIT_BYTES and not interpret:
        raise NotImplementedError(
            f"pallas_tpu: one page's double-buffered keys and values take "
            f"{4 * page_bytes >> 20} MiB of VMEM, over {ONE_PAGE_LIMIT_BYTES >> 20} MiB; "
            f"smaller pages fit"
        )
    per_step = pages_per_step(size, page_bytes, interpret)
    steps, extent = step_pages(group_W, page_W, slot_G, table, offset_S, size, per_step)
    q_GxKxQxS = _with_dummy_group(_own_lanes(by_kv_head(q_GxCxHxD, kv_heads, rows), span))
    pos_GxQx1 = _with_dummy_group(per_row(positions_GxC, r, rows))[..., None]
    real_GxQx1 = _with_dummy_group(per_row(real_GxC, r, rows))[..., None]
    k_NxPxKD = cache.k.reshape(n, size, kv_heads * d)
    v_NxPxKD = cache.v.reshape(n, size, kv_heads * d)

    def by_group(t, group_ref, *_):
        return group_ref[t], 0, 0

    def page_block(place):
        """The operand holding place `place` of each step's pages."""
        return pl.BlockSpec(
            (None, size, kv_heads * d),
            lambda t, group_ref, physical_ref, *_: (physical_ref[t * per_step + place], 0, 0),
        )

    group_block = pl.BlockSpec((None, kv_heads, rows, span), lambda *a: (*by_group(*a), 0))
    group_rows = pl.BlockSpec((None, kv_heads, rows, 1), lambda *a: (*by_group(*a), 0))
    row_block = pl.BlockSpec((None, rows, 1), by_group)
    pages = [page_block(place) for place in range(per_step)]
    outs = [
        jnp.zeros((g + 1, kv_heads, rows, span), q_GxCxHxD.dtype),
        jnp.full((g + 1, kv_heads, rows, 1), -jnp.inf, jnp.float32),
    ]
    kernel = functools.partial(
        _kernel, groups=g, window=window, precision=products_precision(q_GxCxHxD.dtype),
        per_step=per_step, head_dim=d,
    )  # fmt: skip
    operands = [q_GxKxQxS, pos_GxQx1, real_GxQx1, *[k_NxPxKD] * per_step]
    operands += [*[v_NxPxKD] * per_step]
    aliased = len(steps) + len(operands)  # the outputs' first values, after the rest

    def run(part: StepPages, part_extent, part_outs):
        """The kernel over the first `part_extent` steps of `part`, writing their groups'
        results into `part_outs` (aliased: other groups keep theirs)."""
        return pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=len(part),
                grid=(part_extent,),
                in_specs=[group_block, row_block, row_block, *pages, *pages, _ANY, _ANY],
                out_specs=[group_block, group_rows],
                scratch_shapes=[
                    pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),
                    pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),
                    pltpu.VMEM((kv_heads, rows, span), jnp.float32),
                ],
            ),
            out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in part_outs],
            input_output_aliases={aliased: 0, aliased + 1: 1},
            compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
            interpret=interpret,
        )(*part, *operands, *part_outs)

    cap = window_steps(per_step)
    if steps.group.shape[0] <= cap:
        out, lse = run(steps, extent, outs)
    else:
        slot_steps = -(-min(table.shape[1], group_W.shape[0]) // per_step)  # a group's most
        if slot_steps > cap:
            raise NotImplementedError(
                f"pallas_tpu: one slot's pages take {slot_steps} grid steps, more than a "
                f"step list in {STEP_LIST_BYTES >> 10} KiB of SMEM holds ({cap}); larger "
                f"pages fit"
            )
        # Windows of whole groups, in a loop over the list's real steps only. Each reads
        # `cap` steps of the arrays from its first, padded by `cap` so no slice is clamped.
        per_entry = StepPages(1, per_step, 1, 1)  # each array's entries per step
        pad_value = StepPages(g, 0, 0, 0)  # padding steps name the dummy group
        padded = StepPages(*(
            jnp.pad(x, (0, cap * n), constant_values=v)
            for x, n, v in zip(steps, per_entry, pad_value, strict=True)
        ))  # fmt: skip
        last_end_T = last_group_ends(steps.group)

        def next_window(state):
            lo, outs = state
            end = window_end(last_end_T, lo, cap, extent)
            part = StepPages(*(
                jax.lax.dynamic_slice(x, (lo * n,), (cap * n,))
                for x, n in zip(padded, per_entry, strict=True)
            ))  # fmt: skip
            return end, tuple(run(part, end - lo, outs))

        _, (out, lse) = jax.lax.while_loop(
            lambda state: state[0] < extent, next_window, (jnp.int32(0), tuple(outs))
        )
    return from_kv_heads(_from_own_lanes(out[:g], d), lse[:g, ..., 0], c, r)
