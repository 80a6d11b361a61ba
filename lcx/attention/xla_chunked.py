"""Flash attention in plain XLA over the block schedule: the CPU default and the fallback.

FlashAttention-2's online softmax (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023, arXiv 2307.08691) written with `lax.scan` and
`lax.fori_loop` instead of a kernel: a scan over the (row, q block) pairs, and for each a
loop over only the kv blocks `block_schedule` assigns it (dynamic bounds, blocks of other
documents never touched), split into masked edges and an unmasked middle. Nothing of
size Tq x Tk exists; memory is linear in the row.

Backward (the `jax.custom_vjp` of `lcx.attention.flash_vjp`): recomputation from the
saved log-sum-exp in one pass, a scan over kv blocks and for each a loop over the q blocks
of the transposed schedule, accumulating dk, dv in the loop and adding each tile's dq into
a carried [B, ..., Tq, D] buffer (one recomputation of the probabilities, not two).
Grouped-query heads stay grouped ([.., Hkv, G, ..] einsums): K/V are never repeated.

Inside, tensors are heads-first ([B, K, G, T, D] queries, [B, K, T, D] keys), so every
tile's einsum is a batched matrix product over the kv heads without transposes.
Shape letters: Q q-block rows, S kv-block rows, K kv heads, G query heads per kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcx.attention.flash_vjp import flash_attention_vjp
from lcx.attention.kernel_common import (
    MASK_VALUE,
    BlockSizes,
    natural_lse,
    pad_to_blocks,
    products_precision,
    tile_mask,
    tile_schedule,
    visit_blocks,
)
from lcx.attention.segments import Segments

# Tiles tuned on a 2-core CPU (benchmarks/attention.py cpu): 128 x 128 was fastest on short
# documents and on 256-token training rows; 256 x 256 is ~15% faster on one dense 4K row.
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)


def _tile(x, b, axis, start, size):
    """x[b, ..., start:start + size (on `axis`), ...] with dynamic b and start."""
    zero = jnp.zeros((), jnp.int32)  # int32 even under x64: dynamic_slice wants one type
    starts = [zero] * x.ndim
    starts[0], starts[axis] = jnp.asarray(b, jnp.int32), jnp.asarray(start, jnp.int32)
    sizes = list(x.shape)
    sizes[0], sizes[axis] = 1, size
    return jax.lax.dynamic_slice(x, starts, sizes)[0]


def _tile_mask(seg: Segments, b, q_start, k_start, bq, bk, *, causal, window):
    """[Q, S] visibility of one (q block, kv block) tile."""
    q_side = [_tile(x, b, 1, q_start, bq)[:, None] for x in (seg.q_ids, seg.q_positions)]
    k_side = [_tile(x, b, 1, k_start, bk)[None, :] for x in (seg.kv_ids, seg.kv_positions)]
    return tile_mask(q_side[0], k_side[0], q_side[1], k_side[1], causal=causal, window=window)


def _flat_groups(lo, hi, full_lo, full_hi):
    """Scan inputs over the flattened (row, block) pairs: row, block index, the intervals."""
    b, n = lo.shape
    row = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
    block = jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
    return row, block, lo.reshape(-1), hi.reshape(-1), full_lo.reshape(-1), full_hi.reshape(-1)


def _heads_first(x, hkv):
    """[B, T, Hq, D] -> [B, K, G, T, D]."""
    b, t, h, d = x.shape
    return x.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)


def _per_query_heads_first(x, hkv):
    """[B, T, Hq] -> [B, K, G, T]."""
    b, t, h = x.shape
    return x.reshape(b, t, hkv, h // hkv).transpose(0, 2, 3, 1)


def _q_time_major(tiles, b):
    """Scan outputs [B * n, K, G, Q, D] as [B, n * Q, K * G, D]."""
    _, hkv, g, block, d = tiles.shape
    x = tiles.reshape(b, -1, hkv, g, block, d).transpose(0, 1, 4, 2, 3, 5)
    return x.reshape(b, -1, hkv * g, d)


def _kv_time_major(tiles, b):
    """Scan outputs [B * n, K, S, D] as [B, n * S, K, D]."""
    _, hkv, block, d = tiles.shape
    return tiles.reshape(b, -1, hkv, block, d).transpose(0, 1, 3, 2, 4).reshape(b, -1, hkv, d)


def _product(dtype):
    """einsum accumulating in float32 (float64 for float64 inputs) at the inputs' precision."""
    accumulator = jnp.promote_types(dtype, jnp.float32)
    return functools.partial(
        jnp.einsum, preferred_element_type=accumulator, precision=products_precision(dtype)
    )


def _fold_tile(m, l, acc, s, mask, pv):
    """One tile of masked scores `s` folded into the running max, sum and output.

    `mask` None: the tile is fully visible; `pv(p)`: the tile's probabilities times its
    values, in the accumulator's layout.
    """
    m_next = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_next[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_next)
    return m_next, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv(p)


def _finish(m, l, acc):
    """(out, natural lse) from the running max, sum and output; 0 and -inf where unseen."""
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out, natural_lse(m + jnp.log(jnp.where(seen, l, 1.0)), seen)


def _forward(q, k, v, seg: Segments, *, scale, causal, window, blocks):
    """Padded inputs -> (out [B, Tq, Hq, D], lse [B, Tq, Hq] natural, counts [B, nq])."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bq, bk = blocks
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    product = _product(q.dtype)
    full = seg.filled()
    if tq == bq and b > 1:  # rows of one q block each: decoding
        return _forward_rows_together(q, k, v, full, scale, causal, window, bk)
    sched = tile_schedule(seg, *blocks, causal=causal, window=window)
    q5, k4, v4 = _heads_first(q, hkv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def group(_, xs):
        row, i, lo, hi, full_lo, full_hi = xs
        q_KxGxQxD = _tile(q5, row, 3, i * bq, bq)

        def body(j, carry, masked):
            m, l, acc, visited = carry
            k_KxSxD, v_KxSxD = _tile(k4, row, 2, j * bk, bk), _tile(v4, row, 2, j * bk, bk)
            s = product("kgqd,ksd->kgqs", q_KxGxQxD, k_KxSxD) * scale
            mask = None
            if masked:
                mask = _tile_mask(full, row, i * bq, j * bk, bq, bk, causal=causal, window=window)
                s = jnp.where(mask, s, MASK_VALUE)
            pv = lambda p: product("kgqs,ksd->kgqd", p.astype(v.dtype), v_KxSxD)  # noqa: E731
            return *_fold_tile(m, l, acc, s, mask, pv), visited + 1

        shape = (hkv, g, bq)
        init = (
            jnp.full(shape, MASK_VALUE, acc_dtype),
            jnp.zeros(shape, acc_dtype),
            jnp.zeros((*shape, d), acc_dtype),
            jnp.int32(0),
        )
        m, l, acc, visited = visit_blocks(lo, hi, full_lo, full_hi, body, init)
        out, lse = _finish(m, l, acc)
        return None, (out.astype(q.dtype), lse, visited)

    xs = _flat_groups(sched.kv_lo, sched.kv_hi, sched.kv_full_lo, sched.kv_full_hi)
    _, (out, lse, counts) = jax.lax.scan(group, None, xs)
    lse = lse.reshape(b, -1, hkv, g, bq).transpose(0, 1, 4, 2, 3).reshape(b, tq, hq)
    return _q_time_major(out, b), lse, counts.reshape(b, -1)


def _forward_rows_together(q, k, v, full: Segments, scale, causal, window, bk):
    """`_forward` for rows of one q block each, all rows at once per kv block.

    A batch of short query rows (decoding: one row per sequence, a few queries each)
    would pay the scan's fixed cost, and the schedule's sorts, once per row for a few
    small tiles; instead one loop visits the kv blocks any row sees, every row's tile in
    one batched product, masked per row. Which blocks any row sees is one fused
    comparison of the few queries against every key (no block schedule). Keys stay
    time-major, so a decode reads only the visited tiles of its cache. Each row is counted
    as computing all the visited blocks: rows whose keys lie far apart pay for the span
    between them (a cache's slots all start at entry 0, so decoding does not).
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    product = _product(q.dtype)
    q_BxQxKxGxD = q.reshape(b, tq, hkv, hq // hkv, d)
    q_ids, q_pos = full.q_ids[:, :, None], full.q_positions[:, :, None]
    seen_BxQxT = tile_mask(
        q_ids, full.kv_ids[:, None], q_pos, full.kv_positions[:, None], causal=causal, window=window
    )
    seen_blocks = jnp.any(seen_BxQxT.reshape(b, tq, -1, bk), axis=(0, 1, 3))
    index = jnp.arange(seen_blocks.shape[0], dtype=jnp.int32)
    stop = jnp.max(jnp.where(seen_blocks, index + 1, 0))
    start = jnp.minimum(jnp.min(jnp.where(seen_blocks, index, jnp.iinfo(jnp.int32).max)), stop)

    def body(j, carry):
        m, l, acc = carry
        k_BxSxKxD, v_BxSxKxD, ids, pos = (
            jax.lax.dynamic_slice_in_dim(x, j * bk, bk, 1)
            for x in (k, v, full.kv_ids, full.kv_positions)
        )
        mask = tile_mask(q_ids, ids[:, None], q_pos, pos[:, None], causal=causal, window=window)
        mask = mask[:, None, None]  # [B, 1, 1, Q, S]
        s = product("bqkgd,bskd->bkgqs", q_BxQxKxGxD, k_BxSxKxD)
        s = jnp.where(mask, s * scale, MASK_VALUE)
        pv = lambda p: product("bkgqs,bskd->bkgqd", p.astype(v.dtype), v_BxSxKxD)  # noqa: E731
        return _fold_tile(m, l, acc, s, mask, pv)

    shape = (b, hkv, hq // hkv, tq)
    init = (
        jnp.full(shape, MASK_VALUE, acc_dtype),
        jnp.zeros(shape, acc_dtype),
        jnp.zeros((*shape, d), acc_dtype),
    )
    out, lse = _finish(*jax.lax.fori_loop(start, stop, body, init))
    out = out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d)
    return out, lse.transpose(0, 3, 1, 2).reshape(b, tq, hq), jnp.full((b, 1), stop - start)


def _backward(q, k, v, seg: Segments, lse, delta, do, *, scale, causal, window, blocks):
    """dq, dk, dv on padded inputs; lse (finite) and delta [B, Tq, Hq].

    Also returns the q blocks computed per kv block [B, nk].
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bq, bk = blocks
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    product = _product(q.dtype)
    sched = tile_schedule(seg, *blocks, causal=causal, window=window)
    full = seg.filled()
    q5, do5 = _heads_first(q, hkv), _heads_first(do, hkv)
    k4, v4 = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    lse4 = _per_query_heads_first(lse, hkv)
    delta4 = _per_query_heads_first(delta, hkv)

    def q_tiles(row, i):
        """q, dO [K, G, Q, D] and lse, delta [K, G, Q] of one q block."""
        return (
            _tile(q5, row, 3, i * bq, bq),
            _tile(do5, row, 3, i * bq, bq),
            _tile(lse4, row, 3, i * bq, bq),
            _tile(delta4, row, 3, i * bq, bq),
        )

    def probabilities(q_t, k_t, lse_t, row, i, j, masked):
        """p [K, G, Q, S] of one tile, recomputed from the lse; 0 where masked."""
        s = product("kgqd,ksd->kgqs", q_t, k_t) * scale
        p = jnp.exp(s - lse_t[..., None])
        if masked:
            mask = _tile_mask(full, row, i * bq, j * bk, bq, bk, causal=causal, window=window)
            p = jnp.where(mask, p, 0.0)
        return p

    def kv_group(dq_buffer, xs):
        """dk, dv of one kv block over its q blocks; their dq added into the buffer."""
        row, j, lo, hi, full_lo, full_hi = xs
        k_t, v_t = _tile(k4, row, 2, j * bk, bk), _tile(v4, row, 2, j * bk, bk)

        def body(i, carry, masked):
            dk, dv, dq_buf, visited = carry
            q_t, do_t, lse_t, delta_t = q_tiles(row, i)
            p = probabilities(q_t, k_t, lse_t, row, i, j, masked)
            dv = dv + product("kgqs,kgqd->ksd", p.astype(do.dtype), do_t)
            dp = product("kgqd,ksd->kgqs", do_t, v_t)
            ds = (p * (dp - delta_t[..., None])).astype(q.dtype)
            dk = dk + product("kgqs,kgqd->ksd", ds, q_t)
            dq_t = product("kgqs,ksd->kgqd", ds, k_t)
            zero = jnp.zeros((), jnp.int32)
            start = (row, zero, zero, jnp.asarray(i * bq, jnp.int32), zero)
            tile = jax.lax.dynamic_slice(dq_buf, start, (1, hkv, g, bq, d))
            dq_buf = jax.lax.dynamic_update_slice(dq_buf, tile + dq_t[None], start)
            return dk, dv, dq_buf, visited + 1

        zeros = jnp.zeros((hkv, bk, d), acc_dtype)
        init = (zeros, zeros, dq_buffer, jnp.int32(0))
        dk, dv, dq_buffer, visited = visit_blocks(lo, hi, full_lo, full_hi, body, init)
        return dq_buffer, ((dk * scale).astype(k.dtype), dv.astype(v.dtype), visited)

    xs = _flat_groups(sched.q_lo, sched.q_hi, sched.q_full_lo, sched.q_full_hi)
    dq_buffer = jnp.zeros(q5.shape, acc_dtype)
    dq_buffer, (dk, dv, counts) = jax.lax.scan(kv_group, dq_buffer, xs)
    dq = (dq_buffer * scale).astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(q.shape)
    return dq, _kv_time_major(dk, b), _kv_time_major(dv, b), counts.reshape(b, -1)


# (out, lse) on padded inputs, differentiable in q, k, v (and through lse).
_attention = flash_attention_vjp(_forward, _backward)


def _power_of_two_at_least(t: int, floor: int = 8) -> int:
    """The smallest power of two >= max(t, floor)."""
    return max(floor, 1 << (t - 1).bit_length())


def _tiles(block_sizes: BlockSizes | None, tq: int, tk: int) -> tuple[int, int]:
    """(block_q, block_kv), each at most its side rounded up to a power of two (>= 8 for keys).

    Short sides get one small tile, not a padded one; a query side of a few tokens
    (decoding) is not padded at all.
    """
    block_sizes = block_sizes or DEFAULT_BLOCK_SIZES
    return (
        min(block_sizes.block_q, _power_of_two_at_least(tq, floor=1)),
        min(block_sizes.block_kv, _power_of_two_at_least(tk)),
    )


def xla_chunked_attention(
    q,
    k,
    v,
    segments: Segments,
    *,
    causal=True,
    window=None,
    scale=None,
    block_sizes=None,
    count_blocks=False,
):
    """(out [B, Tq, Hq, D], lse [B, Tq, Hq]) through the chunked XLA implementation.

    `block_sizes.block_q` / `block_kv` set the tiles of the forward and the (single)
    backward pass, each capped at its side's length rounded up to a power of two; the
    dq / dkv fields are not used. With
    `count_blocks`, returns (out, lse, counts [B, ceil(Tq / block_q)]): the kv blocks the
    forward computed per q block (no gradient).
    """
    tq, d = q.shape[1], q.shape[3]
    blocks = _tiles(block_sizes, tq, k.shape[1])
    scale = d**-0.5 if scale is None else scale
    qp, kp, vp, seg = pad_to_blocks(q, k, v, segments, *blocks)
    mask = dict(scale=scale, causal=causal, window=window, blocks=blocks)
    if count_blocks:
        out, lse, counts = _forward(qp, kp, vp, seg, **mask)
        return out[:, :tq], lse[:, :tq], counts
    out, lse = _attention(qp, kp, vp, seg, **mask)
    return out[:, :tq], lse[:, :tq]


def xla_chunked_implementation(q, k, v, segments, *, causal, window, scale, block_sizes, interpret):
    """IMPLEMENTATIONS entry (no kernel to interpret)."""
    del interpret
    return xla_chunked_attention(
        q, k, v, segments, causal=causal, window=window, scale=scale, block_sizes=block_sizes
    )


def computed_blocks(q, k, v, segments: Segments, *, causal=True, window=None, block_sizes=None):
    """Blocks each pass computes, to check the skipping: int32 [B, 1, n] per pass.

    "forward": kv blocks per q block; "dkv" (the one backward pass, dq included): q blocks
    per kv block.
    """
    blocks = _tiles(block_sizes, q.shape[1], k.shape[1])
    qp, kp, vp, seg = pad_to_blocks(q, k, v, segments, *blocks)
    mask = dict(scale=1.0, causal=causal, window=window, blocks=blocks)
    _, lse, forward = _forward(qp, kp, vp, seg, **mask)
    zeros = jnp.zeros(lse.shape, lse.dtype)
    *_, dkv = _backward(qp, kp, vp, seg, zeros, zeros, qp, **mask)
    return {"forward": forward[:, None], "dkv": dkv[:, None]}
