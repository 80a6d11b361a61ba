"""The Pallas GPU (Triton) packed attention in interpret mode on the CPU.

Values and gradients against the float64 reference on fresh random inputs and layouts,
edge layouts, block skipping counted inside the kernel, and lowering for CUDA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from lcx.attention import packed_attention, pallas_gpu
from lcx.attention.kernel_common import BlockSizes
from lcx.attention.layout import block_schedule, count_visited, dense_causal_blocks
from lcx.attention.pallas_gpu import DEFAULT_BLOCK_SIZES, packed_attention_gpu
from lcx.attention.reference import reference_attention

SMALL_BLOCKS = BlockSizes(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=32, block_q_dkv=32)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _rng():
    """A fresh generator and its seed, so a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def _random_row(rng, t, block):
    """A random packed row: runs ending on or just past block boundaries, padding gaps."""
    row = np.zeros(t, np.int32)
    pos, doc = int(rng.integers(0, 3)), 1
    while pos < t - 3:
        kind = rng.integers(4)
        if kind == 0:  # end exactly on a block boundary, or one past it
            end = (pos // block + 1) * block + int(rng.integers(0, 2))
        elif kind == 1:  # a gap of padding
            pos += int(rng.integers(1, 5))
            continue
        else:
            end = pos + int(rng.integers(1, t // 2))
        row[pos : min(end, t - 2)] = doc
        pos, doc = end, doc + int(rng.integers(1, 3))
    return row


def _edge_rows(t, block):
    """Rows: one document, one-token documents, boundary starts, all padding, a gap."""
    idx = np.arange(t)
    boundary = 1 + (idx >= block) + (idx >= block + 1) + (idx >= 2 * block) + (idx >= 3 * block + 1)
    middle = np.where(idx < t // 3, 7, np.where(idx < t // 2, 0, 9))
    return np.stack(
        [np.ones(t), idx + 1, boundary, np.zeros(t), middle, np.where(idx < t - 1, 3, 0)]
    ).astype(np.int32)


def _inputs(rng, b, t, hq, hkv, d, dtype):
    """Random q, k, v in `dtype`."""
    return tuple(jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for h in (hq, hkv, hkv))


def _relative_error(got, want):
    """Norm-wise relative error ||got - want|| / ||want|| in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _check_against_reference(q, k, v, seg, *, causal, window, block_sizes, tol, seed):
    """Kernel values and q/k/v gradients within `tol` of the float64 reference; no NaN."""
    kwargs = dict(causal=causal, window=window)

    @jax.jit
    def kernel_vjp(q, k, v, ct):
        out, vjp = jax.vjp(
            lambda q, k, v: packed_attention_gpu(
                q, k, v, seg, block_sizes=block_sizes, interpret=True, **kwargs
            ),
            q, k, v,
        )  # fmt: skip
        return out, vjp(ct)

    rng = np.random.default_rng(seed)
    ct = np.asarray(jnp.asarray(rng.standard_normal(q.shape), q.dtype), np.float64)
    out, grads = kernel_vjp(q, k, v, jnp.asarray(ct, q.dtype))
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        want, vjp = jax.vjp(
            lambda q, k, v: reference_attention(q, k, v, jnp.asarray(seg), **kwargs), q64, k64, v64
        )
        want_grads = vjp(jnp.asarray(ct))
        want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
    for name, got, ref in [
        ("out", out, want),
        *zip(("dq", "dk", "dv"), grads, want_grads, strict=True),
    ]:
        assert np.isfinite(np.asarray(got, np.float32)).all(), f"{name} not finite, {seed=}"
        err = _relative_error(got, ref)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}, {seed=}"
    padding = np.asarray(seg) == 0
    assert np.all(np.asarray(out, np.float32)[padding] == 0), f"padding output not 0, {seed=}"


@pytest.mark.parametrize(
    "dtype,causal,window,hq,hkv",
    [
        (jnp.float32, True, None, 4, 2),
        (jnp.float32, True, 21, 2, 2),
        (jnp.float32, False, None, 4, 1),
        (jnp.float32, False, 19, 2, 2),
        (jnp.bfloat16, True, None, 4, 2),
        (jnp.bfloat16, True, 17, 4, 4),
    ],
)
def test_random_layouts_match_reference(dtype, causal, window, hq, hkv):
    rng, seed = _rng()
    b, t, d = 2, 100, 16  # T not a multiple of the blocks: padded inside, sliced back
    seg = np.stack([_random_row(rng, t, SMALL_BLOCKS.block_q) for _ in range(b)])
    q, k, v = _inputs(rng, b, t, hq, hkv, d, dtype)
    _check_against_reference(
        q, k, v, seg, causal=causal, window=window, block_sizes=SMALL_BLOCKS,
        tol=TOLERANCE[dtype], seed=seed,
    )  # fmt: skip


@pytest.mark.parametrize("causal,window", [(True, None), (False, 5)])
def test_edge_layouts_match_reference(causal, window):
    rng, seed = _rng()
    t, hq, hkv, d = 64, 2, 1, 16
    seg = _edge_rows(t, SMALL_BLOCKS.block_q)
    q, k, v = _inputs(rng, seg.shape[0], t, hq, hkv, d, jnp.float32)
    _check_against_reference(
        q, k, v, seg, causal=causal, window=window, block_sizes=SMALL_BLOCKS,
        tol=TOLERANCE[jnp.float32], seed=seed,
    )  # fmt: skip


def test_head_dim_not_a_power_of_two_and_no_segment_ids():
    rng, seed = _rng()
    q, k, v = _inputs(rng, 1, 40, 2, 2, 12, jnp.float32)
    got = jax.jit(lambda q, k, v: packed_attention_gpu(q, k, v, interpret=True))(q, k, v)
    with jax.enable_x64(True):
        want = reference_attention(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)))
    assert _relative_error(got, want) < 1e-5, f"{seed=}"


def test_counts_match_schedule_on_random_layouts():
    rng, _ = _rng()
    b, t, bq = 2, 96, 16
    seg = np.stack([_random_row(rng, t, bq) for _ in range(b)])
    q, k, v = _inputs(rng, b, t, 2, 2, 16, jnp.float32)
    blocks = BlockSizes(block_q=bq, block_kv=bq)
    _, counts = jax.jit(
        lambda q, k, v: packed_attention_gpu(
            q, k, v, seg, block_sizes=blocks, interpret=True, count_blocks=True
        )
    )(q, k, v)
    sched = block_schedule(seg, block_q=bq, block_kv=bq)
    want = np.maximum(np.asarray(sched.kv_hi) - np.asarray(sched.kv_lo) + 1, 0)
    np.testing.assert_array_equal(np.asarray(counts), np.broadcast_to(want[:, None], counts.shape))


def test_forward_skips_blocks_of_other_documents():
    # 16 documents of 128 tokens in a 2048 row, 128-wide blocks: the kernel computes
    # one block per q block (16), a dense causal kernel 136.
    t, block, n_docs = 2048, 128, 16
    seg = np.repeat(np.arange(1, n_docs + 1, dtype=np.int32), t // n_docs)[None]
    rng, _ = _rng()
    q, k, v = _inputs(rng, 1, t, 1, 1, 16, jnp.float32)
    blocks = BlockSizes(block_q=block, block_kv=block)
    _, counts = jax.jit(
        lambda q, k, v: packed_attention_gpu(
            q, k, v, seg, block_sizes=blocks, interpret=True, count_blocks=True
        )
    )(q, k, v)
    assert counts.shape == (1, 1, t // block)
    assert int(counts.sum()) == n_docs
    assert int(count_visited(*block_schedule(seg, block_q=block, block_kv=block)[:2])[0]) == 16
    assert dense_causal_blocks(t, block, block) == 136


def test_exports_for_cuda_forward_and_backward():
    b, t, hq, hkv, d = 2, 1024, 8, 2, 128
    args = [
        jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    ]

    def forward(q, k, v, seg):
        return packed_attention_gpu(q, k, v, seg, block_sizes=DEFAULT_BLOCK_SIZES)

    def loss(q, k, v, seg):
        out = packed_attention_gpu(q, k, v, seg, window=256, block_sizes=DEFAULT_BLOCK_SIZES)
        return out.astype(jnp.float32).sum()

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for f, kernels in [(forward, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)]:
        exported = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == kernels


def test_bad_block_sizes():
    q = jnp.zeros((1, 32, 2, 16))
    with pytest.raises(ValueError, match="powers of two"):
        packed_attention_gpu(q, q, q, block_sizes=BlockSizes(block_q=24, block_kv=16))
    with pytest.raises(ValueError, match="powers of two"):
        packed_attention_gpu(q, q, q, block_sizes=BlockSizes(block_q=8, block_kv=16))


def test_dispatch_by_name_uses_the_gpu_kernel():
    rng, seed = _rng()
    seg = np.stack([_random_row(rng, 48, 16)])
    q, k, v = _inputs(rng, 1, 48, 2, 1, 16, jnp.float32)
    got = packed_attention(q, k, v, seg, implementation="pallas_gpu", interpret=True)
    want = packed_attention(q, k, v, seg, implementation="xla")
    assert _relative_error(got, want) < 1e-5, f"{seed=}"
    with pytest.raises(NotImplementedError, match="Triton"):
        packed_attention(*(x.astype(jnp.int8) for x in (q, k, v)), implementation="pallas_gpu")


def test_million_token_rows_lower_for_cuda_without_quadratic_memory():
    t = 1 << 20
    args = [
        jax.ShapeDtypeStruct((1, t, 2, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, t, 1, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, t, 1, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, t), jnp.int32),
    ]

    def loss(q, k, v, seg):
        out = packed_attention(q, k, v, seg, implementation="pallas_gpu")
        return out.astype(jnp.float32).sum()

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    f = jax.grad(loss, argnums=(0, 1, 2))
    text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args)
    text = text.mlir_module()
    nq = t // DEFAULT_BLOCK_SIZES.block_q
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert f"{t}x{t}" not in text and f"{nq}x{nq}" not in text


@pytest.mark.parametrize("layout", ["16_documents", "random"])
def test_backward_kernels_compute_only_scheduled_blocks(layout):
    # dq visits the kv interval of each q block, dkv the q interval of each kv block.
    rng, seed = _rng()
    if layout == "16_documents":
        t, block = 2048, 128
        seg = np.repeat(np.arange(1, 17, dtype=np.int32), 128)[None]
    else:
        t, block = 96, 16
        seg = np.stack([_random_row(rng, t, block) for _ in range(2)])
    b, h, d = seg.shape[0], 2, 16
    q, k, v = _inputs(rng, b, t, h, 1, d, jnp.float32)
    lse = jnp.zeros((b, h, t), jnp.float32)
    args = (q, k, v, jnp.asarray(seg), lse, lse, q)
    kw = dict(scale=0.25, causal=True, window=None, blocks=(block, block), interpret=True)
    *_, dq_counts = pallas_gpu._dq(*args, count=True, **kw)
    *_, dkv_counts = pallas_gpu._dkv(*args, count=True, **kw)
    sched = block_schedule(seg, block_q=block, block_kv=block)
    per_q = np.maximum(np.asarray(sched.kv_hi) - np.asarray(sched.kv_lo) + 1, 0)
    per_kv = np.maximum(np.asarray(sched.q_hi) - np.asarray(sched.q_lo) + 1, 0)
    got_q, got_kv = np.asarray(dq_counts)[:, :, ::block], np.asarray(dkv_counts)[:, :, ::block]
    np.testing.assert_array_equal(got_q, np.broadcast_to(per_q[:, None], got_q.shape), f"{seed=}")
    np.testing.assert_array_equal(got_kv, np.broadcast_to(per_kv[:, None], got_kv.shape))
    if layout == "16_documents":
        assert got_q.sum() == got_kv.sum() == 16 * h
