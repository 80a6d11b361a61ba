"""One suite for every attention implementation, against the float64 reference.

The tokamax `AttentionTestBase` pattern: each entry of IMPLEMENTATIONS has a spec with its
capabilities (test block sizes, interpret mode, a block counter, grid-step counts), and
every test below runs on every implementation. Values, log-sum-exp and gradients (also
through the lse) on fresh random inputs and layouts from the seeded `rng` fixture:
self-attention with every mask, edge layouts, a chunk of queries against a longer key
row, decoding against a cache, merged disjoint key splits, bf16, queries that see
nothing, and skipping by count. Pallas kernels run in interpret mode on small grids.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.attention import (
    IMPLEMENTATIONS,
    BlockSizes,
    Segments,
    block_schedule,
    merge_attention,
    packed_attention,
    pallas_gpu,
    pallas_tpu,
    reference_attention,
    xla_chunked,
)
from tests import attention_cases as cases

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
LSE_TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An implementation under test and what it can do."""

    name: str
    block_sizes: BlockSizes | None = None
    interpret: bool = False
    computed_blocks: Callable | None = None  # fn(q, k, v, segments, **mask) -> counts
    grid_steps: bool = False  # its counts include "<pass>_steps" (a compacted grid)
    float64: bool = False  # computes in float64 (else refuses it: NotImplementedError)
    available: bool = True

    def __call__(self, q, k, v, **call):
        """(out, lse) of packed_attention through this implementation."""
        return packed_attention(
            q, k, v, return_lse=True, implementation=self.name, block_sizes=self.block_sizes,
            interpret=self.interpret, **call,
        )  # fmt: skip

    def counts(self, q, k, v, segments, **mask):
        """Blocks each pass computed (and grid steps, for a compacted grid)."""
        extra = {"interpret": True} if self.interpret else {}
        return self.computed_blocks(
            q, k, v, segments, block_sizes=self.block_sizes, **mask, **extra
        )


GPU_BLOCKS = BlockSizes(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=32, block_q_dkv=32)
SPECS = {
    "xla": Implementation("xla", float64=True),
    "xla_chunked": Implementation(
        "xla_chunked",
        BlockSizes(block_q=16, block_kv=8),
        computed_blocks=xla_chunked.computed_blocks,
        float64=True,
    ),
    "pallas_tpu": Implementation(
        "pallas_tpu",
        BlockSizes(block_q=16, block_kv=16),
        interpret=True,
        computed_blocks=pallas_tpu.computed_blocks,
        grid_steps=True,
    ),  # fmt: skip
    "pallas_gpu": Implementation(
        "pallas_gpu",
        GPU_BLOCKS,
        interpret=True,
        computed_blocks=pallas_gpu.computed_blocks,
        available=pallas_gpu.plgpu is not None,  # without Triton: test_dispatch covers it
    ),  # fmt: skip
}


def test_every_implementation_is_under_test():
    assert set(SPECS) == set(IMPLEMENTATIONS)


@pytest.fixture(params=[name for name, spec in SPECS.items() if spec.available])
def impl(request) -> Implementation:
    return SPECS[request.param]


def check_against_reference(impl, q, k, v, rng, **call):
    """Values, lse and gradients within tolerance of float64; exact zeros where unseen."""
    dtype = q.dtype.type
    w = cases.weights(rng, q)
    out, lse, grads = cases.values_and_grads(lambda q, k, v: impl(q, k, v, **call), q, k, v, w)
    ref_out, ref_lse, ref_grads = cases.reference_values_and_grads(q, k, v, w, **call)
    unseen = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), unseen, "lse is -inf exactly where unseen")
    assert np.all(out[unseen] == 0), "queries that see no key must output exactly 0"
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    assert cases.relative_error(out, ref_out) < TOLERANCE[dtype], "out"
    if (~unseen).any():
        assert np.max(np.abs(lse[~unseen] - ref_lse[~unseen])) < LSE_TOLERANCE[dtype], "lse"
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert cases.relative_error(got, want) < TOLERANCE[dtype], name


MASKS = [
    dict(),
    dict(window=5),
    dict(causal=False),
    dict(causal=False, window=7),
    dict(causal=False, window=2**31 - 1),  # as good as no window: no int32 overflow
]


@pytest.mark.parametrize(
    "mask", MASKS, ids=["causal", "window", "bidirectional", "local", "unbounded_window"]
)
def test_self_attention_random_layouts_gqa(impl, rng, mask):
    seg = cases.random_layout(rng, 2, 40)  # 40: not a multiple of the blocks
    q, k, v = cases.qkv(rng, 2, 40, hq=4, hkv=2, d=8, dtype=jnp.float32)
    check_against_reference(impl, q, k, v, rng, segment_ids=seg, **mask)


def test_edge_layouts(impl, rng):
    seg = cases.edge_layouts(t=40, block=16)
    q, k, v = cases.qkv(rng, len(seg), 40, hq=2, hkv=1, d=8, dtype=jnp.float32)
    check_against_reference(impl, q, k, v, rng, segment_ids=seg)


@pytest.mark.parametrize("window", [None, 6])
def test_chunk_against_a_longer_key_row(impl, rng, window):
    # Queries: the last 24 tokens of packed rows; keys: the whole 56-token rows, so a
    # document's earlier chunk is visible and other documents are not.
    call, tq = cases.chunk_against_earlier_chunks(rng, b=2, tk=56, chunk=24)
    q, k, v = cases.qkv(rng, 2, tq, hq=4, hkv=2, d=8, dtype=jnp.float32, tk=56)
    check_against_reference(impl, q, k, v, rng, window=window, **call)


def test_decoding_against_a_cache(impl, rng):
    call, tq = cases.decode_against_cache(rng, slots=3, cache_len=24)
    q, k, v = cases.qkv(rng, 1, tq, hq=4, hkv=2, d=8, dtype=jnp.float32, tk=72)
    check_against_reference(impl, q, k, v, rng, **call)


@pytest.mark.parametrize("mask", [dict(), dict(window=4), dict(causal=False)],
                         ids=["causal", "window", "bidirectional"])  # fmt: skip
def test_rows_of_a_few_queries(impl, rng, mask):
    # Several rows of three queries each (xla_chunked takes its rows-together path).
    call, tq = cases.few_queries_per_row(rng, b=5, tq=3, tk=40)
    q, k, v = cases.qkv(rng, 5, tq, hq=4, hkv=2, d=8, dtype=jnp.float32, tk=40)
    check_against_reference(impl, q, k, v, rng, **call, **mask)


def test_bfloat16(impl, rng):
    seg = cases.random_layout(rng, 2, 48)
    q, k, v = cases.qkv(rng, 2, 48, hq=2, hkv=2, d=16, dtype=jnp.bfloat16)
    check_against_reference(impl, q, k, v, rng, segment_ids=seg, window=21)


@pytest.mark.parametrize("layout", ["chunk", "few_queries"])
def test_float64_to_the_last_digits(impl, rng, layout):
    # In float64 every implementation computes the reference's numbers (values, lse and
    # gradients through both) to ~1e-12: nothing is silently computed in lower precision.
    if layout == "chunk":
        call, tq = cases.chunk_against_earlier_chunks(rng, b=2, tk=40, chunk=24)
    else:
        call, tq = cases.few_queries_per_row(rng, b=2, tq=3, tk=40)
    with jax.enable_x64(True):
        q, k, v = cases.qkv(rng, 2, tq, hq=4, hkv=2, d=8, dtype=jnp.float64, tk=40)
        w = [jnp.asarray(x, jnp.float64) for x in cases.weights(rng, q)]

        def loss(q, k, v, fn):
            out, lse = fn(q, k, v)
            return jnp.sum(out * w[0]) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w[1])

        def ref(q, k, v):
            return reference_attention(q, k, v, return_lse=True, window=9, **call)

        def got(q, k, v):
            return impl(q, k, v, window=9, **call)

        if not impl.float64:  # refused, so the dispatcher moves on to one that serves it
            with pytest.raises(NotImplementedError, match="float64"):
                got(q, k, v)
            got = functools.partial(packed_attention, return_lse=True, window=9, **call)

        def values_and_grads(fn):  # one program each, not op by op
            return jax.jit(lambda q, k, v: (*fn(q, k, v), *jax.grad(loss, (0, 1, 2))(q, k, v, fn)))

        out, lse, *grads = values_and_grads(got)(q, k, v)
        ref_out, ref_lse, *ref_grads = values_and_grads(ref)(q, k, v)
        assert out.dtype == ref_out.dtype == jnp.float64
        # lse is -inf exactly where a query sees no key (whether any does depends on the
        # random layout): compare the pattern, then the finite values.
        seen = np.isfinite(np.asarray(ref_lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
        errors = [
            cases.relative_error(a, b)
            for a, b in zip(
                [out, jnp.where(seen, lse, 0.0), *grads],
                [ref_out, jnp.where(seen, ref_lse, 0.0), *ref_grads],
                strict=True,
            )
        ]
    assert max(errors) < 1e-11, errors


def test_rows_that_see_nothing(impl, rng):
    # An all-padding row beside a real one, and queries whose document has no keys.
    seg = np.zeros((2, 32), np.int32)
    seg[1, :20] = 3
    kv_seg = np.where(seg == 3, 4, 0).astype(np.int32)  # no key shares the queries' id
    q, k, v = cases.qkv(rng, 2, 32, hq=2, hkv=1, d=8, dtype=jnp.float32)
    check_against_reference(impl, q, k, v, rng, segment_ids=seg)
    w = cases.weights(rng, q)
    out, lse, grads = cases.values_and_grads(
        lambda q, k, v: impl(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg), q, k, v, w
    )
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    assert all(np.all(g == 0) for g in grads)


@pytest.mark.parametrize("splits", [2, 4])
def test_merged_disjoint_key_splits_equal_attention_over_all_keys(impl, rng, splits):
    # Keys cut into contiguous ranges; each part attends only its range (other keys get
    # segment id 0); merge_attention of the parts is attention over all keys, values and
    # gradients, through each part's lse.
    call, tq = cases.chunk_against_earlier_chunks(rng, b=2, tk=48, chunk=16)
    q, k, v = cases.qkv(rng, 2, tq, hq=2, hkv=1, d=8, dtype=jnp.float32, tk=48)
    cuts = np.sort(rng.choice(np.arange(1, 48), splits - 1, replace=False))
    ranges = np.split(np.arange(48), cuts)

    def merged(q, k, v):
        parts = []
        for keys in ranges:
            in_part = np.isin(np.arange(48), keys)
            part_call = {**call, "kv_segment_ids": np.where(in_part, call["kv_segment_ids"], 0)}
            parts.append(impl(q, k, v, **part_call))
        return merge_attention(parts)

    w = cases.weights(rng, q)
    out, lse, grads = cases.values_and_grads(merged, q, k, v, w)
    ref_out, ref_lse, ref_grads = cases.reference_values_and_grads(q, k, v, w, **call)
    seen = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)
    assert cases.relative_error(out, ref_out) < 1e-5
    assert np.max(np.abs(lse[seen] - ref_lse[seen])) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert np.isfinite(got).all() and cases.relative_error(got, want) < 1e-5


def _per_block(lo, hi):
    """Blocks an interval schedule visits per block, [B, n]."""
    return np.maximum(np.asarray(hi) - np.asarray(lo) + 1, 0)


@pytest.fixture(
    params=[n for n, spec in SPECS.items() if spec.available and spec.computed_blocks is not None]
)
def blocked_impl(request) -> Implementation:
    """The implementations that skip blocks (all but the dense reference)."""
    return SPECS[request.param]


@pytest.mark.parametrize("layout", ["self", "chunk"])
def test_computes_exactly_the_scheduled_blocks(blocked_impl, rng, layout):
    impl = blocked_impl
    if layout == "self":
        seg = cases.random_layout(rng, 2, 64)
        call = dict(segment_ids=seg)
        q, k, v = cases.qkv(rng, 2, 64, hq=2, hkv=1, d=8, dtype=jnp.float32)
    else:
        call, tq = cases.chunk_against_earlier_chunks(rng, b=2, tk=64, chunk=32)
        q, k, v = cases.qkv(rng, 2, tq, hq=2, hkv=1, d=8, dtype=jnp.float32, tk=64)
    segments = Segments(*(None if call.get(n) is None else jnp.asarray(call[n]) for n in (
        "segment_ids", "kv_segment_ids", "q_positions", "kv_positions")))  # fmt: skip
    counts = impl.counts(q, k, v, segments)
    blocks = impl.block_sizes
    passes = [
        ("forward", (blocks.block_q, blocks.block_kv), False),
        ("dq", blocks.dq, False),  # absent where dq shares the dkv pass (xla_chunked)
        ("dkv", blocks.dkv, True),
    ]
    assert {"forward", "dkv"} <= set(counts)
    for name, (bq, bk), dkv in [p for p in passes if p[0] in counts]:
        sched = block_schedule(call["segment_ids"], block_q=bq, block_kv=bk,
                               **{n: call[n] for n in call if n != "segment_ids"})  # fmt: skip
        want = _per_block(sched.q_lo, sched.q_hi) if dkv else _per_block(sched.kv_lo, sched.kv_hi)
        got = np.asarray(counts[name])
        np.testing.assert_array_equal(got, np.broadcast_to(want[:, None], got.shape), name)
        if impl.grid_steps:  # one step per computed block, one for a group with none
            steps = np.asarray(counts[name + "_steps"])
            np.testing.assert_array_equal(steps, np.maximum(got, 1), name + " grid steps")


def test_xla_chunked_rows_of_one_q_block_visit_the_blocks_any_row_sees(rng):
    # Rows of a few queries go together, one loop over kv blocks for all rows: from the
    # first block any row sees to the last (fewer scan steps, each a batched product).
    # Keys: document 1 on [0, 20), document 2 on [20, 30), padding after, in every row.
    kv_ids = np.zeros((5, 40), np.int32)
    kv_ids[:, :20], kv_ids[:, 20:30] = 1, 2
    kv_positions = cases.document_positions(kv_ids)
    # Row 0 padding, row 1 an id with no key; rows 2-4 see blocks 0, 2-3 and 0.
    q_ids = np.array([0, 7, 1, 2, 1], np.int32)[:, None].repeat(4, 1)
    q_positions = np.array([0, 0, 2, 5, 0], np.int32)[:, None] + np.arange(4, dtype=np.int32)
    segments = Segments(*map(jnp.asarray, (q_ids, kv_ids, q_positions, kv_positions)))
    q, k, v = cases.qkv(rng, 5, 4, hq=2, hkv=1, d=8, dtype=jnp.float32, tk=40)
    blocks = BlockSizes(block_q=16, block_kv=8)
    got = xla_chunked.computed_blocks(q, k, v, segments, block_sizes=blocks)["forward"]
    np.testing.assert_array_equal(np.asarray(got), np.full((5, 1, 1), 4))  # blocks 0-3 of 5
    out = xla_chunked.xla_chunked_attention(q, k, v, segments, block_sizes=blocks)[0]
    want = reference_attention(q, k, v, q_ids, kv_segment_ids=kv_ids, q_positions=q_positions,
                               kv_positions=kv_positions)  # fmt: skip
    assert cases.relative_error(out, want) < 1e-5


def test_odd_head_dim_and_no_segment_ids(impl, rng):
    q, k, v = cases.qkv(rng, 1, 40, hq=2, hkv=2, d=12, dtype=jnp.float32)
    check_against_reference(impl, q, k, v, rng)
