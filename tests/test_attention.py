"""The jnp reference against a direct float64 loop, GQA, windows, padding and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.attention import IMPLEMENTATIONS, packed_attention, reference_attention


def _layout(rng, b, t):
    """Random packed rows: documents of random length, some padding at the end."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        pos, doc = 0, 1
        while pos < t - 2:
            n = int(rng.integers(1, t // 2))
            seg[row, pos : pos + n] = doc
            pos, doc = pos + n, doc + int(rng.integers(1, 3))
        seg[row, t - 2 :] = 0
    return seg


def _loop_attention(q, k, v, seg, causal, window):
    """Attention one query at a time in float64 numpy."""
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    out = np.zeros((b, t, hq, d))
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                keys = [
                    j
                    for j in range(t)
                    if seg[bi, i] != 0
                    and seg[bi, j] == seg[bi, i]
                    and (not causal or j <= i)
                    and (window is None or abs(i - j) < window)
                ]
                if not keys:
                    continue
                s = np.array([q[bi, i, h] @ k[bi, j, h // group] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, keys, h // group]
    return out


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None)])
def test_reference_matches_loop(causal, window):
    rng = np.random.default_rng()
    b, t, hq, hkv, d = 2, 12, 4, 2, 8
    q, k, v = (rng.standard_normal((b, t, h, d)) for h in (hq, hkv, hkv))
    seg = _layout(rng, b, t)
    with jax.enable_x64(True):
        got = reference_attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), seg, causal=causal, window=window
        )
        np.testing.assert_allclose(
            np.asarray(got), _loop_attention(q, k, v, seg, causal, window), rtol=1e-10, atol=1e-12
        )


def test_padding_queries_are_zero_with_finite_gradients():
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.float32) for _ in range(3))
    seg = jnp.zeros((1, 6), jnp.int32)  # an all-padding row
    out = packed_attention(q, k, v, seg, implementation="xla")
    assert np.all(np.asarray(out) == 0)
    grads = jax.grad(lambda q, k, v: packed_attention(q, k, v, seg).sum(), argnums=(0, 1, 2))(
        q, k, v
    )
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_dispatch_and_bad_input():
    assert "xla" in IMPLEMENTATIONS
    q = jnp.zeros((1, 4, 4, 8))
    kv = jnp.zeros((1, 4, 3, 8))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        packed_attention(q, kv, kv)
    with pytest.raises(ValueError, match="window"):
        packed_attention(q, q, q, window=-1)
    with pytest.raises(ValueError, match="segment_ids"):
        packed_attention(q, q, q, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        packed_attention(q, q, q, implementation="cuda_magic")
    reappearing = jnp.asarray([[1, 1, 2, 1]], jnp.int32)
    packed_attention(q, q, q, reappearing)  # not checked unless asked: it is not free
    with pytest.raises(ValueError, match="reappears"):
        packed_attention(q, q, q, reappearing, validate=True)
    packed_attention(q, q, q, jnp.asarray([[3, 3, 0, 5]], jnp.int32), validate=True)
