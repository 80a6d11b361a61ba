"""Shared inputs for the attention tests: packed layouts with every edge case, float64 references.

Every layout helper takes the seeded `rng` fixture's generator. A "case" is q, k, v and
the keyword arguments of one `packed_attention` call (segment ids, positions, mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcx.attention import reference_attention


def edge_layouts(t: int, block: int) -> np.ndarray:
    """Rows: one document; one-token documents; starts on and just after a block boundary;
    all padding; padding in the middle. T need not be a multiple of the block."""
    rows = np.zeros((5, t), np.int32)
    rows[0] = 7
    rows[1] = np.arange(1, t + 1)
    rows[2, :block] = 1
    rows[2, block : block + 1] = 2
    rows[2, block + 1 : 2 * block] = 3
    rows[2, 2 * block :] = 4
    # rows[3] stays all padding
    rows[4, : t // 3] = 5
    rows[4, t // 3 : t // 2] = 0
    rows[4, t // 2 :] = 9
    return rows


def random_layout(rng, b: int, t: int) -> np.ndarray:
    """Random packed rows: random document lengths, padding at the end of some rows."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        pos, doc = 0, 1
        end = t - int(rng.integers(0, t // 4))
        while pos < end:
            n = int(rng.integers(1, t // 2))
            seg[row, pos : min(pos + n, end)] = doc
            pos, doc = pos + n, doc + int(rng.integers(1, 3))
    return seg


def document_positions(seg: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at each run (what the packers emit)."""
    pos = np.zeros_like(seg)
    for i in range(1, seg.shape[1]):
        pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
    return pos


def qkv(rng, b, tq, hq, hkv, d, dtype, tk=None):
    """Random q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D] in `dtype`."""
    tk = tq if tk is None else tk
    shapes = [(b, tq, hq, d), (b, tk, hkv, d), (b, tk, hkv, d)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def chunk_against_earlier_chunks(rng, b, tk, chunk):
    """(segment kwargs, Tq): the last `chunk` tokens of packed rows as queries, the whole
    rows (earlier chunks of the same documents, and other documents) as keys."""
    seg = random_layout(rng, b, tk)
    pos = document_positions(seg)
    kwargs = dict(
        segment_ids=seg[:, -chunk:], kv_segment_ids=seg, q_positions=pos[:, -chunk:],
        kv_positions=pos,
    )  # fmt: skip
    return kwargs, chunk


def few_queries_per_row(rng, b, tq, tk):
    """(segment kwargs, Tq): rows of `tq` queries (a few tokens of one sequence each, as
    in batched decoding) against `tk` packed keys: each row's queries continue one of its
    documents from a random position inside it or just past its end; row 0's queries are
    padding, row 1's id has no key."""
    seg = random_layout(rng, b, tk)
    pos = document_positions(seg)
    q_seg, q_pos = np.zeros((b, tq), np.int32), np.zeros((b, tq), np.int32)
    for row in range(b):
        doc = int(rng.choice(seg[row][seg[row] > 0]))
        q_seg[row] = doc
        q_pos[row] = int(rng.integers(0, np.sum(seg[row] == doc) + 2)) + np.arange(tq)
    q_seg[0], q_seg[1] = 0, 1000
    kwargs = dict(segment_ids=q_seg, kv_segment_ids=seg, q_positions=q_pos, kv_positions=pos)
    return kwargs, tq


def decode_against_cache(rng, slots, cache_len):
    """(segment kwargs, Tq): one query per sequence slot at its next position against a
    cache of `slots` x `cache_len` entries (slot s holds id s + 1 up to its length, then
    padding); one slot is empty, so its query sees nothing."""
    lengths = rng.integers(1, cache_len + 1, slots)
    lengths[int(rng.integers(slots))] = 0
    idx = np.arange(cache_len)
    cache_seg = np.concatenate([np.where(idx < n, s + 1, 0) for s, n in enumerate(lengths)])
    cache_pos = np.tile(idx, slots)
    kwargs = dict(
        segment_ids=np.arange(1, slots + 1, dtype=np.int32)[None],
        kv_segment_ids=cache_seg[None].astype(np.int32),
        q_positions=np.maximum(lengths - 1, 0).astype(np.int32)[None],
        kv_positions=cache_pos[None].astype(np.int32),
    )  # fmt: skip
    return kwargs, slots


def weights(rng, q):
    """Random cotangents for out and lse, so gradients test every element of both."""
    w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    return w_out, w_lse


def _objective(out, lse, w_out, w_lse):
    """sum(out * w_out) + sum(lse * w_lse) over the queries that saw a key."""
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(w_out.dtype) * w_out) + jnp.sum(lse.astype(w_lse.dtype) * w_lse)


def reference_values_and_grads(q, k, v, w, **call):
    """(out, lse, [dq, dk, dv]) of the float64 reference; gradients of `_objective`."""
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        w64 = [jnp.asarray(x, jnp.float64) for x in w]

        def loss(q, k, v):
            return _objective(*reference_attention(q, k, v, return_lse=True, **call), *w64)

        out, lse = reference_attention(q64, k64, v64, return_lse=True, **call)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q64, k64, v64)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def values_and_grads(fn, q, k, v, w):
    """(out, lse, [dq, dk, dv]) as float32 numpy of `fn(q, k, v) -> (out, lse)`, jitted."""

    def loss(q, k, v):
        return _objective(*fn(q, k, v), *w)

    out, lse = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    as32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    return as32(out), as32(lse), [as32(g) for g in grads]


def relative_error(got, want) -> float:
    """||got - want|| / ||want||."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
