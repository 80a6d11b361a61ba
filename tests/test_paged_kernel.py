"""The ragged paged attention kernels (lcx.attention.ragged_paged_tpu, _gpu): in Pallas'
interpreter they equal float64 attention over each slot's own sequence on the paged step
of tests/test_paged_cache.py, and at production sizes they lower for TPU and for CUDA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from lcx.attention import pallas_gpu
from lcx.paged_cache import PagedAttentionCache, PageLayout, paged_cache_attention
from tests.test_attention_lowering import TARGETS, _target, _triton_dots
from tests.test_paged_cache import assert_matches, paged_step

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
PLATFORMS = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}


def _refuses_without_triton(rng) -> bool:
    """True where this JAX has no Pallas Triton backend, after checking that pallas_gpu
    then refuses with NotImplementedError (so `paged_cache_attention` falls back to XLA):
    where the kernel cannot exist, that refusal is what there is to test."""
    if pallas_gpu.plgpu is not None:
        return False
    with pytest.raises(NotImplementedError, match="triton is not available"):
        paged_step(rng, None, jnp.float32, implementation="pallas_gpu", interpret=True)
    return True


# Each kernel in each layout (one query per slot, no window; a token and two drafts per
# slot, a window) and dtype; benchmarks/gpu_check.py's smoke run (tests/
# test_benchmark_gpu_check.py) adds pallas_gpu in float32 on verify rows.
# The TPU kernel gets the host's lists (the engine's, there); the GPU kernel the lists the
# step builds (the engine's on GPU), and the host's.
CASES = [
    ("pallas_tpu", jnp.float32, None, 1, True),
    ("pallas_tpu", jnp.bfloat16, 6, 3, True),
    ("pallas_gpu", jnp.bfloat16, None, 1, True),
    ("pallas_gpu", jnp.float32, 6, 3, False),
]


@pytest.mark.parametrize("implementation, dtype, window, decode_width, host_lists", CASES)
def test_kernel_equals_float64_per_slot_attention(
    rng, window, decode_width, dtype, implementation, host_lists
):
    # Decode tokens (or a token and two drafts per slot) and chunk blocks, shuffled pages,
    # an offset, two q heads per kv head, a padding decode query and a chunk block of
    # mostly padding.
    if implementation == "pallas_gpu" and _refuses_without_triton(rng):
        return
    out, lse, wants, _ = paged_step(
        rng, window, dtype, decode_width, host_lists, implementation=implementation,
        interpret=True,
    )  # fmt: skip
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_matches(out, lse, wants, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def _spec(*shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_kernel_lowers_at_production_sizes(implementation, rng):
    # 32 decode slots and 16 chunk blocks over pages of 128 tokens, 8 q heads on 2 kv
    # heads of 128, bfloat16: 256 decode and 512 chunk work items.
    platform = PLATFORMS[implementation]
    if platform == "cuda" and _refuses_without_triton(rng):
        return
    _, marker, checks = TARGETS[platform]
    slots, pages, size, kv_heads, d, blocks = 32, 4096, 128, 2, 128, 16
    width = slots + 16 * blocks

    def step(q, seg, positions, k, v, table, *items):
        layout = PageLayout(table, *items)
        cache = PagedAttentionCache(k, v)
        return paged_cache_attention(
            q, seg, positions, cache, layout, window=4096, implementation=implementation
        )

    pool = _spec(pages, size, kv_heads, d, dtype=jnp.bfloat16)
    items = [_spec(256), _spec(256), _spec(512), _spec(512)]
    args = [_spec(1, width, 8, d, dtype=jnp.bfloat16), _spec(1, width), _spec(1, width)]
    args += [pool, pool, _spec(slots, 64), *items]
    with _target(platform):
        exported = export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)
        text = exported(*args).mlir_module()
    assert text.count(marker) == 2  # one kernel for decode, one for chunks
    for n in (256, 512):  # nothing gathers the items' pages out of the pool
        assert f"{n}x{size}x{kv_heads}x{d}xbf16" not in text


@pytest.mark.parametrize("dtype,operand", [(jnp.float32, "xf32"), (jnp.bfloat16, "xbf16")])
def test_gpu_kernel_keeps_float32_dots_in_float32(dtype, operand, rng):
    # IEEE float32 products for float32 inputs (Triton's default is TF32), the tensor
    # cores for 16-bit ones; both products of the loop body, for decode and for chunks.
    if _refuses_without_triton(rng):
        return

    def step(q, seg, positions, k, v, table, *items):
        cache, layout = PagedAttentionCache(k, v), PageLayout(table, *items)
        return paged_cache_attention(q, seg, positions, cache, layout, implementation="pallas_gpu")

    pool = _spec(64, 16, 2, 64, dtype=dtype)
    args = [_spec(1, 4 + 16, 8, 64, dtype=dtype), _spec(1, 20), _spec(1, 20), pool, pool]
    kernels, dots, xla_dots = _triton_dots(step, *args, _spec(4, 8), *[_spec(8)] * 4)
    assert kernels == 2 and len(dots) == 2 * 2 and not xla_dots
    for dot in dots:
        operands = dot.split(":")[1].split("->")[0]
        assert f"{operand}>" in operands, dot
        assert operand != "xf32" or "tf32" not in dot, dot


def test_an_unknown_implementation_is_refused():
    layout = PageLayout(jnp.zeros((1, 1), jnp.int32))
    cache = PagedAttentionCache.zeros(1, 8, 1, 8, jnp.float32)
    q, ids = jnp.zeros((1, 1, 1, 8)), jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="implementation='triton' is unknown; valid: None"):
        paged_cache_attention(q, ids, ids, cache, layout, implementation="triton")
