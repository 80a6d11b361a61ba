"""Ring attention on 8 CPU devices against `packed_attention` on the whole row.

Runs in a subprocess: the 8 host devices must be requested before jax starts.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from lcx.attention.ring import balanced_permutation, layout_permutation
from tests.attention_cases import random_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, "tests")
from attention_cases import document_positions, random_layout
from lcx.attention import packed_attention
from lcx.attention.ring import balanced_permutation, layout_permutation, ring_attention
from lcx.train.sharding import MeshShape, make_mesh

assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(int(os.environ["LCX_RING_SEED"]))
b, t, hq, hkv, d = 2, 64, 4, 2, 8
worst = 0.0
for i, n in enumerate((2, 4, 8)):
    mesh = make_mesh(MeshShape(data=1, sequence=n), jax.devices()[:n])
    for j, layout in enumerate(("contiguous", "zigzag", "striped", "balanced")):
        for window in [(None, 11)[(i + j) % 2]]:  # each n: two layouts causal, two windowed
            seg = random_layout(rng, b, t)
            pos = document_positions(seg)
            q, k, v, w = (jnp.asarray(rng.standard_normal(s)) for s in
                          [(b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, hq, d)])
            def whole(q, k, v):
                out = packed_attention(q, k, v, seg, q_positions=pos, window=window,
                                       implementation="xla")
                return jnp.sum(out * w), out
            if layout == "balanced":
                perm = np.stack([balanced_permutation(row, n) for row in seg])
            else:
                perm = np.broadcast_to(layout_permutation(t, n, layout), (b, t))
            def take(x):
                return jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)), 1)

            def ring(q, k, v):
                out = ring_attention(take(q), take(k), take(v), take(seg), take(pos), mesh=mesh,
                                     window=window, implementation="xla_chunked")
                return jnp.sum(out * take(w)), out
            (_, want), want_grads = jax.value_and_grad(whole, (0, 1, 2), has_aux=True)(q, k, v)
            ring_grad = jax.jit(jax.value_and_grad(ring, (0, 1, 2), has_aux=True))
            (_, got), got_grads = ring_grad(q, k, v)
            np.testing.assert_allclose(got, take(want), atol=1e-10, err_msg=f"{n} {layout}")
            for g, h in zip(got_grads, want_grads):
                np.testing.assert_allclose(g, h, atol=1e-10, err_msg=f"{n} {layout} grad")
            worst = max(worst, float(jnp.max(jnp.abs(got - take(want)))))
print("max error", worst)

# Skipped steps, counted by hand: 4 shards of 16 tokens, document A on shards 0-1, B on
# shard 2, C on shard 3 (contiguous, causal). Device d runs its local step and, of the
# arriving shards, only those of its own document in its past: device 1 sees shard 0;
# every other arriving shard is skipped: 3 + 2 + 3 + 3 = 11 of 16 steps.
mesh = make_mesh(MeshShape(data=1, sequence=4), jax.devices()[:4])
seg = np.repeat(np.array([[1, 1, 2, 3]]), 16, axis=1).astype(np.int32)
pos = document_positions(seg)
q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 8))) for _ in range(3))
out, skipped = ring_attention(q, k, v, seg, pos, mesh=mesh, return_skipped=True)
print("skipped", int(skipped))
# The same row with documents of 8 tokens under a window of 4 crossing no shard edge
# sees nothing beyond the local shard: 4 * 3 = 12 skipped. All padding: all 16.
seg8 = np.repeat(np.arange(1, 9)[None], 8, axis=1).astype(np.int32)
_, skipped8 = ring_attention(q, k, v, seg8, document_positions(seg8), mesh=mesh, window=4,
                             return_skipped=True)
_, skipped0 = ring_attention(q, k, v, 0 * seg, pos, mesh=mesh, return_skipped=True)
print("skipped windowed", int(skipped8), "padding", int(skipped0))
"""


@pytest.mark.slow
def test_ring_attention_equals_packed_attention_and_skips_the_steps_a_hand_count_predicts(rng):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
        LCX_RING_SEED=str(int(rng.integers(2**31))), PYTHONPATH=ROOT,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 11\n" in result.stdout, result.stdout
    assert "skipped windowed 12 padding 16" in result.stdout, result.stdout


def test_layouts_are_permutations_that_balance_causal_work(rng):
    t, n = 64, 4
    for layout in ("contiguous", "zigzag", "striped"):
        assert sorted(layout_permutation(t, n, layout)) == list(range(t))
    for i in range(150):  # balanced: a permutation keeping each document one run per shard
        shards = (2, 4, 8)[i % 3]
        seg = random_layout(rng, 1, t)[0]
        perm = balanced_permutation(seg, shards)
        assert sorted(perm) == list(range(t))
        for shard in perm.reshape(shards, -1):
            ids, index = seg[shard], shard
            for d in set(ids) - {0}:
                where = np.flatnonzero(ids == d)
                assert np.all(np.diff(where) == 1) and np.all(np.diff(index[where]) > 0)
    # One causal document: the keys each shard's queries see, summed per shard.
    for layout, spread in (("contiguous", 7.0), ("zigzag", 1.0), ("striped", 1.2)):
        shards = layout_permutation(t, n, layout).reshape(n, -1)
        work = (shards + 1).sum(axis=1)
        assert work.max() / work.min() <= spread, (layout, work)
