"""Production sizes without a TPU or GPU: lowering through jax.export, memory, block counts."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from lcx.attention import BlockSizes, Segments, packed_attention, pallas_gpu, pallas_tpu
from lcx.attention.step_list import DEFAULT_CAPACITY
from tests import attention_cases as cases

TRITON = "__gpu$xla.gpu.triton"
TARGETS = {
    "tpu": ("pallas_tpu", "tpu_custom_call", []),
    "cuda": ("pallas_gpu", TRITON, [export.DisabledSafetyCheck.custom_call(TRITON)]),
}


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _target(platform):
    """Where to lower: for CUDA an abstract H100, since this host has no GPU (JAX 0.11's
    Triton lowering asks the device for its compute capability; 0.10 assumed 9.0)."""
    if platform != "cuda":
        return contextlib.nullcontext()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=h100)
    return jax.sharding.use_abstract_mesh(mesh)


def _export(platform, *, b, tq, tk, hq=8, hkv=2, d=128):
    """MLIR text of forward and backward (through out and lse) exported for `platform`."""
    implementation, _, checks = TARGETS[platform]
    args = [_spec(b, tq, hq, d), _spec(b, tk, hkv, d), _spec(b, tk, hkv, d)]
    args.append(_spec(b, tq, dtype=jnp.int32))
    if tq != tk:  # kv segment ids, q positions, kv positions
        args += [_spec(b, tk, dtype=jnp.int32), _spec(b, tq, dtype=jnp.int32)]
        args.append(_spec(b, tk, dtype=jnp.int32))

    def forward(q, k, v, seg, *layout):
        names = ("kv_segment_ids", "q_positions", "kv_positions")
        return packed_attention(q, k, v, seg, implementation=implementation, return_lse=True,
                                **dict(zip(names, layout, strict=False)))  # fmt: skip

    def backward(q, k, v, *rest):
        def loss(q, k, v):
            out, lse = forward(q, k, v, *rest)
            return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with _target(platform):
        return [
            export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
                *args
            ).mlir_module()
            for f in (forward, backward)
        ]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("tq,tk", [(4096, 4096), (1024, 8192)], ids=["self", "chunk"])
def test_lowers_at_production_sizes(platform, tq, tk):
    if platform == "cuda" and pallas_gpu.plgpu is None:
        with pytest.raises(NotImplementedError):
            _export(platform, b=2, tq=tq, tk=tk)
        return
    marker = TARGETS[platform][1]
    forward, backward = _export(platform, b=2, tq=tq, tk=tk)
    assert forward.count(marker) == 1 and backward.count(marker) == 3


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_million_token_rows_lower_without_quadratic_memory(platform):
    if platform == "cuda" and pallas_gpu.plgpu is None:
        return  # covered by test_lowers_at_production_sizes: refused, then the fallback
    t = 1 << 20
    for text in _export(platform, b=1, tq=t, tk=t, hq=2, hkv=1):
        assert text.count(TARGETS[platform][1]) >= 1
        for n in (t, t // 64, t // 128):  # no T x T or blocks x blocks array anywhere
            assert f"{n}x{n}" not in text
    if platform == "tpu":  # the work list's SMEM operands are one window long
        assert f"tensor<{DEFAULT_CAPACITY}xi32>" in text


def _temp_bytes(t, implementation):
    """XLA's temp buffer bytes for forward+backward of one row of t tokens."""
    q = jnp.zeros((1, t, 4, 32), jnp.float32)
    seg = jnp.ones((1, t), jnp.int32)

    def loss(q, k, v):
        return packed_attention(q, k, v, seg, implementation=implementation).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_xla_chunked_memory_grows_linearly():
    sizes = [_temp_bytes(t, "xla_chunked") for t in (4096, 8192, 16384)]
    assert sizes[1] < 2.3 * sizes[0] and sizes[2] < 2.3 * sizes[1], sizes
    assert sizes[2] < 0.05 * _temp_bytes(16384, "xla")  # the reference holds T x T scores


def test_tpu_kernel_steps_only_on_scheduled_blocks_at_production_blocks(rng):
    # 16 documents of 128 tokens in a 2,048 row with 128 blocks: 16 grid steps per head,
    # where a grid over every block pair takes 256.
    seg = np.repeat(np.arange(1, 17, dtype=np.int32), 128)[None]
    q = jnp.asarray(rng.standard_normal((1, 2048, 1, 8)), jnp.float32)
    counts = pallas_tpu.computed_blocks(
        q, q, q, Segments(jnp.asarray(seg)), block_sizes=BlockSizes(block_q=128, block_kv=128),
        interpret=True,
    )  # fmt: skip
    for name in ("forward", "dq", "dkv"):
        assert int(np.sum(counts[name])) == int(np.sum(counts[name + "_steps"])) == 16


def test_tpu_kernel_runs_the_work_list_in_windows(rng):
    # A capacity of one q block's kv blocks per window: many windows, one pallas_call each,
    # the outputs carried through them; values and gradients as with one window.
    call, tq = cases.chunk_against_earlier_chunks(rng, b=2, tk=64, chunk=48)
    q, k, v = cases.qkv(rng, 2, tq, hq=2, hkv=1, d=8, dtype=jnp.float32, tk=64)
    segments = Segments(*(jnp.asarray(call[n]) for n in (
        "segment_ids", "kv_segment_ids", "q_positions", "kv_positions")))  # fmt: skip
    blocks = BlockSizes(block_q=16, block_kv=16)

    def attention(capacity):
        def fn(q, k, v):
            return pallas_tpu.packed_attention_tpu(
                q, k, v, segments, block_sizes=blocks, interpret=True, capacity=capacity
            )

        return fn

    w = cases.weights(rng, q)
    one = cases.values_and_grads(attention(DEFAULT_CAPACITY), q, k, v, w)
    many = cases.values_and_grads(attention(1), q, k, v, w)
    ref_out, ref_lse, ref_grads = cases.reference_values_and_grads(q, k, v, w, **call)
    for got, want in zip([many[0], *many[2]], [ref_out, *ref_grads], strict=True):
        assert cases.relative_error(got, want) < 1e-5
    for a, b in zip([one[0], one[1], *one[2]], [many[0], many[1], *many[2]], strict=True):
        np.testing.assert_array_equal(a, b)


def _triton_dots(fn, *args):
    """(kernels, their `tt.dot` lines, the XLA dots around them) of `fn` lowered for CUDA."""
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    with _target("cuda"):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    kernels = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if "mhlo.backend_config" in inner.attributes and inner.name.endswith("call"):
                        config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
                        kernels.append(ir.StringAttr(config["ir"]).value_bytes)
                    walk(inner.operation)

    walk(module.operation)
    context = ir.Context()
    triton.dialect.register_dialect(context)
    lines = [line for ir_bytes in kernels
             for line in str(ir.Module.parse(ir_bytes, context=context)).splitlines()]  # fmt: skip
    dots = [line.strip() for line in lines if "tt.dot" in line]
    xla_dots = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
    return len(kernels), dots, xla_dots


@pytest.mark.parametrize("dtype,operand", [(jnp.float32, "xf32"), (jnp.bfloat16, "xbf16")])
def test_gpu_kernels_keep_float32_dots_in_float32(dtype, operand):
    # Triton's default for a float32 dot is TF32 (about 3e-4 relative error): the kernels
    # ask for IEEE float32 on float32 inputs, and keep 16-bit inputs on the tensor cores.
    def forward_and_grads(q, k, v):
        def loss(q, k, v):
            return packed_attention(q, k, v, implementation="pallas_gpu").astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    q = _spec(1, 128, 4, 64, dtype=dtype)
    kv = _spec(1, 128, 2, 64, dtype=dtype)
    if pallas_gpu.plgpu is None:
        with pytest.raises(NotImplementedError):
            _triton_dots(forward_and_grads, q, kv, kv)
        return
    kernels, dots, xla_dots = _triton_dots(forward_and_grads, q, kv, kv)
    # Around the kernels too: no float32 product at XLA's default precision (the
    # backward's delta = rowsum(dO * O) once was one, in bf16 training as well).
    assert not [d for d in xla_dots if "xf32>" in d and "HIGHEST" not in d], xla_dots
    # Forward, dq and dkv kernels with 2, 3 and 4 products, each loop body traced three
    # times (masked blocks on either side, unmasked ones between).
    assert kernels == 3 and len(dots) == 3 * (2 + 3 + 4)
    for dot in dots:
        operands = dot.split(":")[1].split("->")[0]
        assert f"{operand}>" in operands, dot
        # (TF32 is Triton's flag for float32 operands; 16-bit operands ignore it.)
        assert operand != "xf32" or "tf32" not in dot, dot


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
def test_xla_implementations_keep_float32_products_in_float32(implementation):
    # XLA on a GPU runs a default-precision float32 product in TF32 (on a TPU in bf16
    # passes): float32 inputs ask for HIGHEST, 16-bit ones keep the backend's default.
    def forward_and_grads(q, k, v):
        def loss(q, k, v):
            out = packed_attention(q, k, v, implementation=implementation)
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    for dtype, highest in [(jnp.float32, True), (jnp.bfloat16, False)]:
        q, kv = _spec(1, 256, 4, 64, dtype=dtype), _spec(1, 256, 2, 64, dtype=dtype)
        lowered = jax.jit(forward_and_grads).trace(q, kv, kv).lower(lowering_platforms=("cuda",))
        dots = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) >= 5  # two products forward, three or more backward
        assert all(("precision = [HIGHEST, HIGHEST]" in d) == highest for d in dots), dots
