"""The Pallas TPU kernels: interpret mode against float64, skipping by count, TPU lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from lcx.attention import BlockSizes, block_schedule, count_visited, packed_attention, pallas_tpu
from lcx.attention.pallas_tpu import packed_attention_tpu
from tests import attention_cases as cases

SMALL = BlockSizes(block_q=16, block_kv=16)


def _tpu(block_sizes=SMALL, **mask):
    return lambda q, k, v, seg: packed_attention_tpu(
        q, k, v, seg, block_sizes=block_sizes, interpret=True, **mask
    )


def _check(fn, q, k, v, seg, w, tol, **mask):
    out, grads = cases.kernel_values_and_grads(fn, q, k, v, seg, w)
    ref_out, ref_grads = cases.reference_values_and_grads(q, k, v, seg, w, **mask)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    assert cases.relative_error(out, ref_out) < tol
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert cases.relative_error(g, r) < tol, f"d{name}"
    pad = np.asarray(seg) == 0
    assert np.all(out[pad] == 0), "padding queries must output exactly 0"


def test_edge_layouts_gqa_float32():
    rng = np.random.default_rng()
    seg = cases.edge_layouts(t=40, block=16)  # T = 40: not a multiple of the block
    q, k, v = cases.qkv(rng, len(seg), 40, hq=4, hkv=2, d=8, dtype=jnp.float32)
    w = cases.loss_weights(rng, q.shape)
    _check(_tpu(), q, k, v, seg, w, 1e-5)


@pytest.mark.parametrize(
    "mask", [dict(window=5), dict(causal=False), dict(causal=False, window=9)], ids=str
)
def test_random_layouts_masks(mask):
    rng = np.random.default_rng()
    seg = cases.random_layout(rng, b=2, t=48)
    q, k, v = cases.qkv(rng, 2, 48, hq=2, hkv=1, d=8, dtype=jnp.float32)
    w = cases.loss_weights(rng, q.shape)
    _check(_tpu(**mask), q, k, v, seg, w, 1e-5, **mask)


def test_bfloat16():
    rng = np.random.default_rng()
    seg = cases.random_layout(rng, b=2, t=48)
    q, k, v = cases.qkv(rng, 2, 48, hq=2, hkv=2, d=16, dtype=jnp.bfloat16)
    w = cases.loss_weights(rng, q.shape)
    _check(_tpu(), q, k, v, seg, w, 2e-2)


def test_the_kernel_computes_only_scheduled_blocks():
    # 16 documents of 128 tokens in a 2,048 row with 128 blocks: 16 blocks, not 136.
    seg = np.repeat(np.arange(1, 17, dtype=np.int32), 128)[None]
    q = k = v = jnp.ones((1, 2048, 1, 8), jnp.float32)
    blocks = BlockSizes(block_q=128, block_kv=128)
    _, counts = packed_attention_tpu(
        q, k, v, seg, block_sizes=blocks, interpret=True, count_blocks=True
    )
    sched = block_schedule(seg, block_q=128, block_kv=128)
    assert int(counts.sum()) == int(count_visited(sched.kv_lo, sched.kv_hi)[0]) == 16


@pytest.mark.parametrize("layout", ["8_documents", "random"])
def test_backward_kernels_compute_only_scheduled_blocks(layout):
    # dq visits the kv interval of each q block, dkv the q interval of each kv block.
    rng = np.random.default_rng()
    t, block = 128, 16
    if layout == "8_documents":
        seg = np.repeat(np.arange(1, 9, dtype=np.int32), 16)[None]
    else:
        seg = cases.random_layout(rng, 1, t)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in cases.qkv(rng, 1, t, 1, 1, 8, jnp.float32))
    lse = jnp.zeros((1, 1, t, 1), jnp.float32)
    blocks = BlockSizes(block_q=block, block_kv=block)
    *_, dq_counts, dkv_counts = pallas_tpu._backward(
        q, k, v, jnp.asarray(seg), q, lse, q, scale=0.3, causal=True, window=None,
        block_sizes=blocks, interpret=True, count=True,
    )  # fmt: skip
    sched = block_schedule(seg, block_q=block, block_kv=block)
    per_q = np.maximum(np.asarray(sched.kv_hi) - np.asarray(sched.kv_lo) + 1, 0)
    per_kv = np.maximum(np.asarray(sched.q_hi) - np.asarray(sched.q_lo) + 1, 0)
    np.testing.assert_array_equal(np.asarray(dq_counts)[:, 0], per_q, f"{seg=}")
    np.testing.assert_array_equal(np.asarray(dkv_counts)[:, 0], per_kv, f"{seg=}")
    if layout == "8_documents":
        assert int(np.sum(dq_counts)) == int(np.sum(dkv_counts)) == 8


def _export_for_tpu(t, b=1, hq=8, hkv=2, d=128):
    args = [
        jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    ]

    def forward(q, k, v, seg):
        return packed_attention(q, k, v, seg, implementation="pallas_tpu")

    def backward(q, k, v, seg):
        loss = lambda q, k, v: forward(q, k, v, seg).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return [export.export(jax.jit(f), platforms=["tpu"])(*args) for f in (forward, backward)]


def test_lowers_for_tpu_at_production_block_sizes():
    for exported in _export_for_tpu(t=4096, b=2):
        assert "tpu_custom_call" in exported.mlir_module()


def test_million_token_rows_lower_without_quadratic_memory():
    t = 1 << 20
    seg = jnp.repeat(jnp.arange(1, 257, dtype=jnp.int32), t // 256)[None]
    sched = jax.jit(lambda s: block_schedule(s, block_q=128, block_kv=128))(seg)
    assert sched.kv_lo.shape == (1, t // 128)
    for exported in _export_for_tpu(t=t, hq=2, hkv=1):
        text = exported.mlir_module()
        assert f"{t}x{t}" not in text and f"{t // 128}x{t // 128}" not in text
