"""The ragged paged attention kernels (lcx.attention.ragged_paged_tpu, _gpu): in Pallas'
interpreter they equal float64 attention over each slot's own sequence on the paged step
of tests/test_paged_cache.py, and at production sizes they lower for TPU and for CUDA."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from lcx.attention import pallas_gpu, ragged_paged_tpu, ragged_paged_xla
from lcx.attention.ragged_paged_tpu import step_pages
from lcx.paged_cache import PagedAttentionCache, PageLayout, paged_cache_attention
from tests.test_attention_lowering import TARGETS, _target, _triton_dots
from tests.test_paged_cache import PAGE, assert_matches, paged_step

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
# Each kernel gets the lists the step builds (the engine's) and the host's; the TPU
# kernel's grid steps take 3 pages (groups of 1 to 6 pages: whole, part-filled and single
# steps), one, or every page a group has.
CASES = [
    ("pallas_tpu", jnp.float32, None, 1, True, 3),
    ("pallas_tpu", jnp.bfloat16, 6, 3, True, 1),
    ("pallas_tpu", jnp.float32, 6, 3, False, 3),
    ("pallas_tpu", jnp.float32, None, 1, True, 8),
    ("pallas_gpu", jnp.bfloat16, None, 1, True, None),
    ("pallas_gpu", jnp.float32, 6, 3, False, None),
]


@pytest.mark.parametrize(
    "implementation, dtype, window, decode_width, host_lists, pages_per_step", CASES
)
def test_kernel_equals_float64_per_slot_attention(
    rng, window, decode_width, dtype, implementation, host_lists, pages_per_step, monkeypatch
):
    # Decode tokens (or a token and two drafts per slot) and chunk blocks, shuffled pages,
    # an offset, two q heads per kv head, a padding decode query and a chunk block of
    # mostly padding.
    if implementation == "pallas_gpu" and _refuses_without_triton(rng):
        return
    if pages_per_step is not None:
        monkeypatch.setattr(ragged_paged_tpu, "KEYS_PER_STEP", pages_per_step * PAGE)
        assert ragged_paged_tpu.pages_per_step(PAGE, 1, interpret=True) == pages_per_step
    out, lse, wants, _ = paged_step(
        rng, window, dtype, decode_width, host_lists, implementation=implementation,
        interpret=True,
    )  # fmt: skip
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_matches(out, lse, wants, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize(
    "heads, dtype",
    [((8, 4, 64), jnp.float32), ((16, 8, 32), jnp.bfloat16)],
    ids=["4 kv heads of 64", "8 kv heads of 32"],
)
def test_tpu_kernel_reads_heads_narrower_than_a_lane_tile_from_the_tile(
    rng, heads, dtype, monkeypatch
):
    # Kv heads of 64 (Llama 3.2 1B's, Qwen2.5 0.5B's width) or 32 fill 128-lane tiles, two
    # or four heads in each, two tiles: every kv head reads its tile, its queries at its
    # own lanes. Verify rows and a window; 3 pages a grid step.
    _, kv_heads, d = heads
    assert ragged_paged_tpu.lane_span(d, kv_heads) == 128
    monkeypatch.setattr(ragged_paged_tpu, "KEYS_PER_STEP", 3 * PAGE)
    out, lse, wants, _ = paged_step(
        rng, 6, dtype, 3, False, heads=heads, implementation="pallas_tpu", interpret=True
    )
    assert_matches(out, lse, wants, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_tpu_kernel_lane_spans():
    span = ragged_paged_tpu.lane_span
    assert span(128, 2) == 128 and span(256, 8) == 256  # lane-aligned heads: their own
    assert span(64, 1) == 64  # one head: the page's whole width
    assert span(64, 2) == span(32, 8) == 128  # narrow heads: their lane tile
    # Neither: a head across two tiles (96), or a tile past the page's lanes (3 x 64).
    assert span(96, 2) is None and span(64, 3) is None
    q = _spec(1, 1, 4, 96, dtype=jnp.bfloat16)
    cache = PagedAttentionCache(*[_spec(8, 16, 2, 96, dtype=jnp.bfloat16)] * 2)
    with pytest.raises(NotImplementedError, match="head_dim=96 must be a multiple of 128"):
        ragged_paged_tpu.ragged_paged_attention_tpu(
            q, _spec(1, 1), _spec(1, 1), _spec(1), _spec(4), _spec(4), cache=cache,
            table=_spec(2, 4), offset_S=_spec(2), window=None,
        )  # fmt: skip


@pytest.mark.parametrize("per_step", [1, 3, 4])
def test_tpu_grid_steps_cover_each_groups_pages_once_and_fetch_only_real_pages(rng, per_step):
    # Random work lists as the host makes them: G groups of 0 to 9 consecutive pages from
    # a random first page, then padding items (W items in all); a random page table.
    g, per_slot, w = 5, 12, 56
    steps_of = jax.jit(step_pages, static_argnums=(5, 6))
    for i in range(20):
        count_G = rng.integers(0, 10, g) if i else np.zeros(g, np.int64)  # first: no items
        first_G = rng.integers(0, per_slot - count_G + 1)
        real = int(count_G.sum())
        group_W = np.full(w, g, np.int32)
        page_W = np.zeros(w, np.int32)
        group_W[:real] = np.repeat(np.arange(g), count_G)
        page_W[:real] = np.concatenate(
            [f + np.arange(n) for f, n in zip(first_G, count_G, strict=True)]
        )
        table = rng.permutation(g * per_slot).reshape(g, per_slot).astype(np.int32)
        offset_S = rng.integers(0, 5, g).astype(np.int32)
        steps, extent = steps_of(group_W, page_W, np.arange(g), table, offset_S, PAGE, per_step)
        group_T, start_T, keys_T = (np.asarray(x) for x in (steps.group, steps.start, steps.keys))
        physical_TxM = np.asarray(steps.physical).reshape(-1, per_step)
        # Each group's steps: consecutive, ceil(n / per_step) of them, its pages in order.
        expected_steps = -(-count_G // per_step)
        assert len(group_T) == min(w, -(-w // per_step) + g)
        assert (group_T[: expected_steps.sum()] == np.repeat(np.arange(g), expected_steps)).all()
        assert (group_T[expected_steps.sum() :] == g).all()
        assert extent == max(expected_steps.sum(), 1)  # the steps the grid runs
        for s in range(g):
            at = np.flatnonzero(group_T == s)
            pages = [physical_TxM[t, : keys_T[t] // PAGE] for t in at]
            want = table[s, first_G[s] : first_G[s] + count_G[s]]
            np.testing.assert_array_equal(np.concatenate([[], *pages]), want)
            np.testing.assert_array_equal(
                start_T[at], offset_S[s] + (first_G[s] + per_step * np.arange(len(at))) * PAGE
            )
        # A place whose page changes from the step before is a fetch; the first step
        # fetches every place.
        physical_TxM = physical_TxM[:extent]
        fetches = per_step + (physical_TxM[1:] != physical_TxM[:-1]).sum()
        assert fetches <= real + per_step


def test_tpu_kernel_without_items_gives_zeros(rng):
    # Every item padding (group G): the grid runs one padding step, every query keeps 0
    # and lse -inf.
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
    cache = PagedAttentionCache.zeros(4, PAGE, 2, 8, jnp.float32)
    out, lse = ragged_paged_tpu.ragged_paged_attention_tpu(
        q, jnp.ones((2, 3), bool), jnp.zeros((2, 3), jnp.int32), jnp.arange(2),
        jnp.full(8, 2), jnp.zeros(8, jnp.int32), cache=cache, table=jnp.zeros((2, 2), jnp.int32),
        offset_S=jnp.zeros(2, jnp.int32), window=None, interpret=True,
    )  # fmt: skip
    assert not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()


def test_tpu_kernel_reads_only_the_listed_pages(rng, monkeypatch):
    # A list that stops short of its groups' queries (pages 0-1 of slot 0 and page 1 of
    # slot 1, whose queries sit on their third pages) equals the XLA read of the same list
    # with 3 pages a step: the spare places hold pages the causal mask would let through.
    monkeypatch.setattr(ragged_paged_tpu, "KEYS_PER_STEP", 3 * PAGE)
    cache = PagedAttentionCache(
        *(jnp.asarray(rng.standard_normal((8, PAGE, 2, 8)), jnp.float32) for _ in "kv")
    )
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 8)), jnp.float32)
    args = (q, jnp.ones((2, 1), bool), jnp.full((2, 1), 2 * PAGE + 1), jnp.arange(2))
    lists = jnp.asarray([0, 0, 1, 2]), jnp.asarray([0, 1, 1, 0])
    common = dict(
        cache=cache, table=jnp.asarray([[3, 5, 1], [0, 6, 2]]), offset_S=jnp.zeros(2, int),
        window=None,
    )  # fmt: skip
    out, lse = ragged_paged_tpu.ragged_paged_attention_tpu(*args, *lists, **common, interpret=True)
    want_out, want_lse = ragged_paged_xla.ragged_paged_attention_xla(*args, *lists, **common)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_tpu_kernel_in_windows_of_steps_equals_float64(rng, monkeypatch):
    # SMEM's budget made room for 4 steps of 2 pages (a slot's 8 pages): the list runs as
    # several calls on windows of whole groups' steps, in a loop over the real steps
    # only, its outputs aliased through; the result is float64 attention's as in one
    # call. The chunk blocks take 3 and 2 steps: windows of 3 and 2 (4 would cut one).
    monkeypatch.setattr(ragged_paged_tpu, "KEYS_PER_STEP", 2 * PAGE)
    monkeypatch.setattr(ragged_paged_tpu, "STEP_LIST_BYTES", 4 * 4 * (3 + 2))
    ends, window_end = [], ragged_paged_tpu.window_end

    def recorded(last_end_T, lo, size, extent):
        end = window_end(last_end_T, lo, size, extent)
        record = lambda *a: ends.append(tuple(map(int, a)))  # noqa: E731
        jax.debug.callback(record, lo, end, extent, ordered=True)  # calls in turn
        return end

    monkeypatch.setattr(ragged_paged_tpu, "window_end", recorded)
    out, lse, wants, _ = paged_step(
        rng, 6, jnp.float32, 3, False, implementation="pallas_tpu", interpret=True
    )
    assert_matches(out, lse, wants, rtol=1e-5, atol=1e-5)
    calls = [[]]  # each kernel call's windows (lo, end), run one after another
    for lo, end, extent in ends:
        calls[-1].append((lo, end))
        if end == extent:
            calls.append([])
    assert calls[-1] == [] and [(0, 3), (3, 5)] in calls
    for windows in calls[:-1]:
        assert windows[0][0] == 0 and all(0 < end - lo <= 4 for lo, end in windows)
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))


def test_tpu_pages_per_step_fit_their_budgets():
    # 512 keys a step within 4 MiB of double-buffered pages; 1 for pages that are not
    # whole sublane tiles.
    bf16_page = lambda kv_heads: 16 * kv_heads * 128 * 2  # noqa: E731
    assert ragged_paged_tpu.pages_per_step(16, bf16_page(2)) == 32
    assert ragged_paged_tpu.pages_per_step(16, bf16_page(32)) == 8  # 4 x 512 KiB
    assert ragged_paged_tpu.pages_per_step(8, 1) == 1

    def read(pool, q, table):
        """The paged read of one query per slot, the pallas_tpu kernel asked for."""
        cache = PagedAttentionCache(
            jnp.zeros(pool.shape, pool.dtype), jnp.zeros(pool.shape, pool.dtype)
        )
        ids = jnp.arange(1, table.shape[0] + 1)[None]
        return paged_cache_attention(
            q, ids, ids, cache, PageLayout(table), implementation="pallas_tpu"
        )

    # The step list built in the step for 128 slots x 32K tokens of 16-token pages
    # (262,144 items, 8,320 steps of 32 pages) passes the SMEM budget: the kernel runs in
    # a loop over windows of its steps (the test above). It refuses (and the XLA read
    # serves the call) where one slot's steps pass a window, and where one float32 page
    # of 128 tokens x 64 kv heads of 128, double-buffered with its values, takes 16 MiB
    # of VMEM.
    pool = jax.ShapeDtypeStruct((4096, 16, 2, 128), jnp.bfloat16)
    q = _spec(1, 128, 8, 128, dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(functools.partial(read, pool))(q, _spec(128, 2048)))
    assert jaxpr.count("pallas_call[") == 1 and jaxpr.count("while[") == 1
    assert ragged_paged_tpu.window_steps(32) == 3744  # 140 bytes a step
    with pytest.raises(NotImplementedError, match="one slot's pages take 3750 grid steps"):
        one = _spec(1, 1, 8, 128, dtype=jnp.bfloat16)
        jax.eval_shape(functools.partial(read, pool), one, _spec(1, 120_000))
    pool = jax.ShapeDtypeStruct((64, 128, 64, 128), jnp.float32)
    q = _spec(1, 4, 64, 128, dtype=jnp.float32)
    with pytest.raises(NotImplementedError, match="take 16 MiB of VMEM, over 8 MiB"):
        jax.eval_shape(functools.partial(read, pool), q, _spec(4, 8))


def _spec(*shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize(
    "implementation, size, host_lists, step_list_bytes, kv_heads, d",
    [
        ("pallas_tpu", 128, True, None, 2, 128),
        ("pallas_tpu", 16, False, None, 2, 128),
        ("pallas_tpu", 16, False, 8 << 10, 2, 128),  # in-graph lists in windows of 58 steps
        ("pallas_tpu", 16, False, None, 2, 64),  # narrow heads: lm_tiny's, one lane tile
        ("pallas_tpu", 16, False, None, 8, 64),  # Llama 3.2 1B's: four tiles
        ("pallas_gpu", 128, True, None, 2, 128),
    ],
)
def test_kernel_lowers_at_production_sizes(
    implementation, size, host_lists, step_list_bytes, kv_heads, d, rng, monkeypatch
):
    # 32 decode slots and 16 chunk blocks over pages of 128 tokens (the TPU kernel: 4
    # pages a grid step; and of 16, 32 a step, its lists built in the step as the engine
    # does), 4 q heads per kv head, bfloat16: 256 decode and 512 chunk work items from
    # the host.
    platform = PLATFORMS[implementation]
    if platform == "cuda" and _refuses_without_triton(rng):
        return
    _, marker, checks = TARGETS[platform]
    slots, pages, blocks = 32, 4096, 16
    width = slots + 16 * blocks

    def step(q, seg, positions, k, v, table, *items):
        layout = PageLayout(table, *items)
        cache = PagedAttentionCache(k, v)
        return paged_cache_attention(
            q, seg, positions, cache, layout, window=4096, implementation=implementation
        )

    pool = _spec(pages, size, kv_heads, d, dtype=jnp.bfloat16)
    items = [_spec(256), _spec(256), _spec(512), _spec(512)] if host_lists else []
    args = [_spec(1, width, 4 * kv_heads, d, dtype=jnp.bfloat16), _spec(1, width)]
    args += [_spec(1, width)]
    args += [pool, pool, _spec(slots, 64), *items]

    def lowered():
        with _target(platform):
            fresh = jax.jit(lambda *a: step(*a))  # traced anew: no cached trace
            exported = export.export(fresh, platforms=[platform], disabled_checks=checks)
            return exported(*args).mlir_module()

    text = lowered()
    if step_list_bytes:  # the kernel calls sit in loops over windows: more loops than in one
        monkeypatch.setattr(ragged_paged_tpu, "STEP_LIST_BYTES", step_list_bytes)
        one_window, text = text, lowered()
        assert text.count("stablehlo.while") > one_window.count("stablehlo.while")
    assert text.count(marker) == 2  # one kernel for decode, one for chunks
    # Nothing gathers the items' pages out of the pool: the pool is all there is of its
    # shape.
    assert set(re.findall(rf"(\d+)x{size}x{kv_heads}x{d}xbf16", text)) == {str(pages)}


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
