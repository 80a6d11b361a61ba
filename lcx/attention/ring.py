"""Ring attention over packed rows: the row split over the `sequence` mesh axis.

Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (2023, arXiv 2310.01889): each device keeps its shard of the queries while the
shards of keys and values (with their segment ids and positions) travel the ring by
`lax.ppermute`; every step runs the implementation `packed_attention` would pick
(`lcx.attention.dispatch`, so the Pallas kernels and `xla_chunked` serve here), merged
by log-sum-exp (`merge_attention`). The backward pass is a custom VJP that sends the
keys and values around the ring again with their dK/dV accumulators, recomputing each
step: no step's activations are stored. A step whose arriving shard holds no key
visible to the local queries (other documents, or all in the causal future) is
skipped, compute and all (`lax.cond`), and counted.

Causal load balance is a permutation of the row applied once in the input pipeline
(`sequence_layout`), not per layer: with explicit positions, attention is the same
function of any token order in which each document stays one run of non-decreasing
positions (true of every layout here). `zigzag` (the 2n chunks of the row, device i
holding chunks i and 2n - 1 - i; Llama 3's context parallelism) and `striped` (token t on
device t mod n; Brandon et al., "Striped Attention", arXiv 2311.09431) balance one long
causal document. Packed rows need more: where documents fall decides each shard's work
and which ring steps can be skipped. `balanced` (the default, lcx's own) picks per row,
of those layouts and one that keeps documents whole inside shards, the one whose ring
visits the fewest blocks on its critical path; `benchmarks/ring_balance.py` measures
them all.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lcx.attention.dispatch import attend_segments
from lcx.attention.layout import token_ranges
from lcx.attention.merge import merge_attention
from lcx.attention.segments import Segments, segments_of

LAYOUTS = ("contiguous", "zigzag", "striped", "balanced")


# ---- layouts -----------------------------------------------------------------------------


def layout_permutation(length: int, shards: int, layout: str) -> np.ndarray:
    """int [length]: row index of the token placed at each index of the permuted row.

    Shard i of the permuted row is `permuted[i * length // shards : (i + 1) * ...]`.
    """
    if layout not in LAYOUTS or layout == "balanced":
        raise ValueError(f"layout={layout!r}; valid: {LAYOUTS[:3]} ('balanced' is per row)")
    index = np.arange(length)
    if layout == "contiguous" or shards == 1:
        return index
    if layout == "striped":
        if length % shards:
            raise ValueError(f"striped layout: length {length} must be a multiple of {shards}")
        return index.reshape(-1, shards).T.reshape(-1)
    if length % (2 * shards):
        raise ValueError(f"zigzag layout: length {length} must be a multiple of {2 * shards}")
    chunks = index.reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(shards)])


def sequence_layout(batch: dict, shards: int, layout: str) -> dict:
    """A batch of [B, T] arrays in ring layout, next-token targets computed first.

    Adds `targets` (the next token) and `target_mask` (a target exists: the next token
    continues the same real document), and `target_weights` (the next token's loss
    weight) when the batch has `weights`, in the original order, then permutes every array
    along T; `lm_loss` reads them, so the loss needs no un-permuting.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    out = dict(batch)
    if "targets" not in out:
        out["targets"] = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
        same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)
        out["target_mask"] = np.concatenate([same, np.zeros_like(same[:, :1])], axis=1)
        if "weights" in out:  # a target's weight is its token's (lcx.posttrain.sft)
            w = np.asarray(out["weights"])
            nxt = np.concatenate([w[:, 1:], np.zeros_like(w[:, :1])], axis=1)
            out["target_weights"] = np.where(out["target_mask"], nxt, 0).astype(w.dtype)
    if layout == "balanced":
        rows = np.stack([balanced_permutation(row, shards) for row in np.asarray(seg)])
        return {k: np.take_along_axis(np.asarray(v), rows, axis=1) for k, v in out.items()}
    permutation = layout_permutation(tokens.shape[1], shards, layout)
    return {k: np.asarray(v)[:, permutation] for k, v in out.items()}


def _runs(segment_ids):
    """(start, length, id) of each run of equal ids along a row."""
    edges = np.flatnonzero(np.diff(segment_ids)) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [len(segment_ids)]]))
    return [(int(a), int(n), int(segment_ids[a])) for a, n in zip(starts, lengths, strict=True)]


def balanced_permutation(segment_ids, shards: int, block: int = 512) -> np.ndarray:
    """int [T]: the document-aware layout of one packed row over `shards` devices.

    Of the contiguous, zigzag and striped layouts and `_dealt_documents` (documents
    kept whole where they fit), the one whose ring visits the fewest blocks on its
    critical path (`ring_critical_blocks`: per step, the device with the most). No
    fixed layout is best for every mix of document lengths
    (benchmarks/ring_balance.py); per row the best of these is.
    """
    segment_ids = np.asarray(segment_ids)
    t = len(segment_ids)
    if t % (2 * shards):
        raise ValueError(f"balanced layout: length {t} must be a multiple of {2 * shards}")
    candidates = [layout_permutation(t, shards, name) for name in LAYOUTS[:3]]
    dealt = _dealt_documents(segment_ids, shards)
    candidates += [] if dealt is None else [dealt]
    work = [ring_critical_blocks(segment_ids, p, shards, block) for p in candidates]
    return candidates[int(np.argmin(work))].astype(np.int32)


def ring_critical_blocks(segment_ids, permutation, shards: int, block: int) -> int:
    """Blocks on the ring's critical path for a row laid out by `permutation`.

    A (query block, key block) pair is visited when some document has a key in the key
    block at or before (causal) one of its queries in the query block; per ring step i
    the device d with the most visits against shard (d - i) mod n sets the step's cost.
    """
    segment_ids = np.asarray(segment_ids)
    t = len(segment_ids)
    size = t // shards
    block = min(max(block, t // 128), size)  # at most 128 blocks: [blocks, blocks, docs]
    laid = segment_ids[permutation]
    order = np.asarray(permutation)  # original index: a document's order of positions
    ids, doc = np.unique(laid[laid != 0], return_inverse=True)
    blocks = t // block
    last = np.full((blocks, len(ids)), -1)  # latest query of each document per block
    first = np.full((blocks, len(ids)), t)  # earliest key
    where = np.flatnonzero(laid != 0)
    np.maximum.at(last, (where // block, doc), order[where])
    np.minimum.at(first, (where // block, doc), order[where])
    visits = (first[None, :, :] <= last[:, None, :]).any(-1)  # [q block, kv block]
    per_shard = size // block
    pairs = visits.reshape(shards, per_shard, shards, per_shard).sum(axis=(1, 3))
    d = np.arange(shards)
    return int(sum(pairs[d, (d - i) % shards].max() for i in range(shards)))


def _dealt_documents(segment_ids, shards: int) -> np.ndarray | None:
    """Documents longer than a shard split zigzag; the others, longest first, dealt to
    the shards in serpentine order (0..n-1, n-1..0, ...), the lists laid end to end and
    cut at each shard's room (at most n - 1 of them cross a shard edge); padding last."""
    t = len(segment_ids)
    size = t // shards
    long_parts = [[] for _ in range(shards)]
    dealt = [[] for _ in range(shards)]
    short = []
    for start, n, ident in _runs(segment_ids):
        index = np.arange(start, start + n)
        if ident == 0:
            continue
        if n <= size:
            short.append(index)
            continue
        pieces = np.array_split(index, 2 * shards)  # the first ones a token longer
        turn = len(long_parts[0])  # long documents so far: rotate who gets those
        for j in range(shards):
            i = (j + turn) % shards
            long_parts[j].append(np.concatenate([pieces[i], pieces[-1 - i]]))
    order = [*range(shards), *reversed(range(shards))]
    for k, index in enumerate(sorted(short, key=len, reverse=True)):
        dealt[order[k % len(order)]].append(index)
    padding = [np.flatnonzero(segment_ids == 0)]
    stream = np.concatenate([np.zeros(0, np.int64)] + [i for d in dealt for i in d] + padding)
    if any(sum(map(len, parts)) > size for parts in long_parts):
        return None  # long documents' pieces overfill a shard: no such layout
    out, at = [], 0
    for i in range(shards):
        room = size - sum(len(x) for x in long_parts[i])
        out.extend(long_parts[i])
        out.append(stream[at : at + room])
        at += room
    return np.concatenate(out)


# ---- which ring steps have work --------------------------------------------------------


def any_visible(q_ids, q_positions, kv_ids, kv_positions, *, causal, window):
    """bool: whether any query of [B, Tq] sees any key of [B, Tk] (token-exact).

    The key range of every query from `token_ranges` (the block schedule's search over
    each segment's run of sorted positions); a query sees something iff its range is not
    empty.
    """
    segments = Segments(q_ids, kv_ids, q_positions, kv_positions)
    (key_lo, key_hi), _ = token_ranges(segments, causal=causal, window=window)
    return jnp.any(key_hi >= key_lo)


# ---- the ring ------------------------------------------------------------------------------


def sequence_mesh(axis="sequence"):
    """The ambient mesh (`jax.set_mesh`) when its `axis` has more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get(axis, 1) == 1:
        return None
    return mesh


def ring_attention(
    q,
    k,
    v,
    segment_ids,
    positions,
    *,
    mesh,
    axis="sequence",
    causal=True,
    window=None,
    scale=None,
    implementation=None,
    block_sizes=None,
    interpret=False,
    return_lse=False,
    return_skipped=False,
):
    """Self-attention of packed rows [B, T, H, D] whose T is sharded over `axis` of `mesh`.

    Same semantics as `packed_attention(q, k, v, segment_ids, q_positions=positions)` on
    the whole row (in any `sequence_layout`). The batch is sharded over the mesh's other
    axes that divide it (except `tensor`), heads over `tensor` where it divides them.
    `return_skipped`: also the number of (device, step) pairs skipped, summed over the mesh.
    """
    n = mesh.shape[axis]
    b, t, hq, _ = q.shape
    if t % n:
        raise ValueError(f"ring attention: row length {t} must be a multiple of {axis}={n}")
    batch_axes = tuple(
        a for a in mesh.axis_names if a not in (axis, "tensor") and mesh.shape[a] > 1
    )
    if b % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and hq % tensor == 0 and k.shape[2] % tensor == 0 else None
    tokens = PartitionSpec(batch_axes or None, axis, heads, None)
    ids = PartitionSpec(batch_axes or None, axis)
    attend = functools.partial(
        _attend,
        causal=causal,
        window=window,
        scale=scale,
        implementation=implementation,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    ring = _make_ring(attend, axis, n, causal, window)

    def local(q, k, v, seg, pos):
        """One device's queries against every shard of keys."""
        out, lse, skipped = ring(q, k, v, seg, pos)
        return out, lse, jax.lax.psum(skipped, mesh.axis_names)

    out, lse, skipped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, ids, ids),
        out_specs=(tokens, PartitionSpec(*tokens[:3]), PartitionSpec()),
        check_vma=False,
    )(q, k, v, segment_ids, positions)
    result = (out, lse) if return_lse else (out,)
    result += (skipped,) if return_skipped else ()
    return result if len(result) > 1 else out


def _attend(q, k, v, q_ids, q_pos, kv_ids, kv_pos, **kwargs):
    """One ring step: (out, lse) of the local queries against an arriving shard."""
    segments = segments_of(q, k, q_ids, kv_ids, q_pos, kv_pos)
    return attend_segments(q, k, v, segments, **kwargs)


def _make_ring(attend, axis, n, causal, window):
    """The per-device ring (forward and custom VJP) over `n` shards of `axis`."""
    send = [(j, (j + 1) % n) for j in range(n)]
    shift = lambda *xs: tuple(jax.lax.ppermute(x, axis, send) for x in xs)  # noqa: E731

    def visible(seg, pos, kv_seg, kv_pos):
        """Whether the arriving shard holds a key the local queries see."""
        return any_visible(seg, pos, kv_seg, kv_pos, causal=causal, window=window)

    def step(q, seg, pos, k, v, kv_seg, kv_pos):
        """(out, lse, skipped 0/1) of one step in float32 or wider; skipped if nothing is seen."""
        acc = jnp.promote_types(q.dtype, jnp.float32)

        def compute():
            out, lse = attend(q, k, v, seg, pos, kv_seg, kv_pos)
            return out.astype(acc), lse.astype(acc)

        def skip():
            return jnp.zeros(q.shape, acc), jnp.full(q.shape[:3], -jnp.inf, acc)

        see = visible(seg, pos, kv_seg, kv_pos)
        out, lse = jax.lax.cond(see, compute, skip)
        return out, lse, 1 - see.astype(jnp.int32)

    def forward(q, k, v, seg, pos):
        """(out, lse, skipped steps): the local step, then n - 1 arriving shards."""
        out, lse, skipped = step(q, seg, pos, k, v, seg, pos)

        def body(_, carry):
            out, lse, skipped, k, v, kv_seg, kv_pos = carry
            k, v, kv_seg, kv_pos = shift(k, v, kv_seg, kv_pos)
            o, l, s = step(q, seg, pos, k, v, kv_seg, kv_pos)
            out, lse = merge_attention([(out, lse), (o, l)])
            return out, lse, skipped + s, k, v, kv_seg, kv_pos

        out, lse, skipped, *_ = jax.lax.fori_loop(
            0, n - 1, body, (out, lse, skipped, k, v, seg, pos)
        )
        return out.astype(q.dtype), lse, skipped

    @jax.custom_vjp
    def ring(q, k, v, seg, pos):
        return forward(q, k, v, seg, pos)

    def ring_fwd(q, k, v, seg, pos):
        out, lse, skipped = forward(q, k, v, seg, pos)
        return (out, lse, skipped), (q, k, v, seg, pos, out, lse)

    def ring_bwd(residuals, cotangents):
        q, k, v, seg, pos, out, lse = residuals
        d_out, d_lse, _ = cotangents
        acc = jnp.promote_types(q.dtype, jnp.float32)
        d_out, out_acc = d_out.astype(acc), out.astype(acc)

        def grads(k, v, kv_seg, kv_pos):
            """(dq, dk, dv) of this step's part of the merged output."""

            def compute():
                part = lambda q, k, v: attend(q, k, v, seg, pos, kv_seg, kv_pos)  # noqa: E731
                (o, l), vjp = jax.vjp(part, q, k, v)
                # out = sum_j w_j o_j with w_j = exp(lse_j - lse): d o_j = w_j d out and
                # d lse_j = w_j (d out . (o_j - out) + d lse).
                seen = jnp.isfinite(lse)
                w = jnp.where(seen, jnp.exp(l - jnp.where(seen, lse, 0.0)), 0.0)
                d_l = w * (jnp.sum(d_out * (o.astype(acc) - out_acc), axis=-1) + d_lse)
                dq, dk, dv = vjp(((w[..., None] * d_out).astype(o.dtype), d_l.astype(l.dtype)))
                return tuple(x.astype(acc) for x in (dq, dk, dv))

            def skip():
                return tuple(jnp.zeros(x.shape, acc) for x in (q, k, v))

            return jax.lax.cond(visible(seg, pos, kv_seg, kv_pos), compute, skip)

        def body(_, carry):
            dq, k, v, kv_seg, kv_pos, dk, dv = carry
            gq, gk, gv = grads(k, v, kv_seg, kv_pos)
            k, v, kv_seg, kv_pos, dk, dv = shift(k, v, kv_seg, kv_pos, dk + gk, dv + gv)
            return dq + gq, k, v, kv_seg, kv_pos, dk, dv

        zeros = lambda x: jnp.zeros(x.shape, acc)  # noqa: E731
        dq, k_last, v_last, seg_last, pos_last, dk, dv = jax.lax.fori_loop(
            0, n - 1, body, (zeros(q), k, v, seg, pos, zeros(k), zeros(v))
        )
        gq, gk, gv = grads(k_last, v_last, seg_last, pos_last)
        dk, dv = shift(dk + gk, dv + gv)  # each shard's gradient arrives home
        return (dq + gq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    ring.defvjp(ring_fwd, ring_bwd)
    return ring
