"""Shared inputs for the kernel tests: packed layouts with every edge case, float64 references."""

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


def qkv(rng, b, t, hq, hkv, d, dtype):
    """Random q, k, v in `dtype`."""
    shapes = [(b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def loss_weights(rng, shape):
    """Random output cotangent, so gradients test every output element."""
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def reference_values_and_grads(q, k, v, seg, w, **mask):
    """Output and dq, dk, dv of sum(out * w) in float64."""
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        w64 = jnp.asarray(w, jnp.float64)

        def loss(q, k, v):
            return jnp.sum(reference_attention(q, k, v, seg, **mask) * w64)

        out = reference_attention(q64, k64, v64, seg, **mask)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q64, k64, v64)
        return np.asarray(out), [np.asarray(g) for g in grads]


def kernel_values_and_grads(fn, q, k, v, seg, w):
    """Output and dq, dk, dv of sum(out * w) through a kernel `fn(q, k, v, seg)`."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * w)

    out = fn(q, k, v, seg)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def relative_error(got, want) -> float:
    """||got - want|| / ||want||."""
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
