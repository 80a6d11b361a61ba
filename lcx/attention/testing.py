"""Random packed layouts and float64 checks for attention implementations.

What the test suite runs on every implementation, reusable where the suite cannot go:
`benchmarks/gpu_check.py` checks the kernels on a GPU against the float64 reference on
the host, and a new implementation can be checked the same way before it is registered
in `IMPLEMENTATIONS`. A "case" is q, k, v and the keyword arguments of one
`packed_attention` call (segment ids, positions, mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcx.attention.reference import reference_attention


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


def exponential_rows(row_len: int, num_rows: int, mean: int, seed: int = 0) -> np.ndarray:
    """Rows packed back to back with exponential document lengths of mean `mean`."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((num_rows, row_len), np.int32)
    for row in seg:
        pos, doc = 0, 1
        while pos < row_len:
            n = max(1, int(rng.exponential(mean)))
            row[pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
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
        segment_ids=seg[:, -chunk:],
        kv_segment_ids=seg,
        q_positions=pos[:, -chunk:],
        kv_positions=pos,
    )
    return kwargs, chunk


def weights(rng, q):
    """Random cotangents for out and lse, so gradients test every element of both."""
    w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    return w_out, w_lse


def objective(out, lse, w_out, w_lse):
    """sum(out * w_out) + sum(lse * w_lse) over the queries that saw a key."""
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(w_out.dtype) * w_out) + jnp.sum(lse.astype(w_lse.dtype) * w_lse)


def reference_values_and_grads(q, k, v, w, **call):
    """(out, lse, [dq, dk, dv]) of the float64 reference; gradients of `objective`."""
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        w64 = [jnp.asarray(x, jnp.float64) for x in w]

        def loss(q, k, v):
            out_lse = reference_attention(q, k, v, return_lse=True, **call)
            return objective(*out_lse, *w64), out_lse

        # One compiled program (not op by op): values and gradients together.
        grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q64, k64, v64)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def values_and_grads(fn, q, k, v, w):
    """(out, lse, [dq, dk, dv]) as float32 numpy of `fn(q, k, v) -> (out, lse)`, jitted."""

    def loss(q, k, v):
        out_lse = fn(q, k, v)
        return objective(*out_lse, *w), out_lse

    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    as32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    return as32(out), as32(lse), [as32(g) for g in grads]


def relative_error(got, want) -> float:
    """||got - want|| / ||want||."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
