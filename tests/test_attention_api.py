"""The attention contract: the reference against a loop, bad input, dispatch, merging, varlen."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.attention import (
    BlockSizes,
    api,
    cu_seqlens_to_segment_ids,
    merge_attention,
    packed_attention,
    pallas_gpu,
    reference_attention,
    segment_ids_to_cu_seqlens,
)
from tests import attention_cases as cases


def _loop_attention(q, k, v, seg, kv_seg, q_pos, kv_pos, causal, window):
    """Attention one query at a time in float64 numpy."""
    b, tq, hq, d = q.shape
    group = hq // k.shape[2]
    out = np.zeros((b, tq, hq, d))
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                keys = [
                    j
                    for j in range(k.shape[1])
                    if seg[bi, i] != 0
                    and kv_seg[bi, j] == seg[bi, i]
                    and (not causal or kv_pos[bi, j] <= q_pos[bi, i])
                    and (window is None or abs(q_pos[bi, i] - kv_pos[bi, j]) < window)
                ]
                if not keys:
                    continue
                s = np.array([q[bi, i, h] @ k[bi, j, h // group] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, keys, h // group]
    return out


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None), (False, 4)])
@pytest.mark.parametrize("cross", [False, True])
def test_reference_matches_loop(rng, causal, window, cross):
    b, hq, hkv, d = 2, 4, 2, 8
    if cross:
        call, tq = cases.chunk_against_earlier_chunks(rng, b, tk=20, chunk=8)
    else:
        seg = cases.random_layout(rng, b, 12)
        call, tq = dict(segment_ids=seg), 12
    tk = call.get("kv_segment_ids", call["segment_ids"]).shape[1]
    q, k, v = (rng.standard_normal((b, t, h, d)) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    seg = call["segment_ids"]
    kv_seg = call.get("kv_segment_ids", seg)
    q_pos = call.get("q_positions", np.broadcast_to(np.arange(tq), seg.shape))
    kv_pos = call.get("kv_positions", np.broadcast_to(np.arange(tk), kv_seg.shape))
    with jax.enable_x64(True):
        got = reference_attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, window=window, **call
        )
    want = _loop_attention(q, k, v, seg, kv_seg, q_pos, kv_pos, causal, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


def test_bad_input_is_one_line_naming_the_argument():
    q = jnp.zeros((1, 4, 4, 8))
    kv = jnp.zeros((1, 4, 3, 8))
    longer = jnp.zeros((1, 6, 2, 8))
    seg = jnp.ones((1, 4), jnp.int32)
    errors = [
        (lambda: packed_attention(q, kv, kv), "multiple of kv heads"),
        (lambda: packed_attention(q, q, q, window=-1), "window"),
        (lambda: packed_attention(q, q, q, jnp.zeros((1, 5), jnp.int32)), "segment_ids"),
        (lambda: packed_attention(q, q, q, implementation="cuda_magic"), "implementation"),
        (lambda: packed_attention(q, longer, longer), r"kv_segment_ids \[B, Tk\] = \(1, 6\)"),
        (lambda: packed_attention(q, longer, longer, seg), "kv_segment_ids"),
        (
            lambda: packed_attention(q, longer, longer, kv_segment_ids=jnp.ones((1, 6))),
            "kv_segment_ids was given with segment_ids=None",
        ),
        (lambda: packed_attention(q, q, q, q_positions=jnp.zeros((1, 3))), "q_positions"),
        (
            lambda: packed_attention(
                q,
                longer,
                longer,
                seg,
                kv_segment_ids=jnp.ones((1, 6)),
                kv_positions=jnp.zeros((2, 6)),
            ),  # fmt: skip
            r"kv_positions must be \[B, T\] = \(1, 6\)",
        ),
    ]
    for call, message in errors:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_validate_checks_runs_and_positions_on_both_sides():
    q = jnp.zeros((1, 4, 2, 8))
    reappearing = jnp.asarray([[1, 1, 2, 1]], jnp.int32)
    packed_attention(q, q, q, reappearing)  # not checked unless asked: it is not free
    with pytest.raises(ValueError, match="segment_ids row 0, index 3: segment 1 reappears"):
        packed_attention(q, q, q, reappearing, validate=True)
    packed_attention(q, q, q, jnp.asarray([[3, 3, 0, 5]], jnp.int32), validate=True)
    seg = jnp.asarray([[2, 2, 2, 2]], jnp.int32)
    with pytest.raises(ValueError, match="q_positions row 0, index 2: position 0 after 5"):
        packed_attention(q, q, q, seg, q_positions=jnp.asarray([[4, 5, 0, 1]]), validate=True)
    keys = jnp.zeros((1, 6, 2, 8))
    kv_seg = jnp.asarray([[2, 2, 0, 2, 2, 2]], jnp.int32)
    with pytest.raises(ValueError, match="kv_segment_ids row 0, index 3: segment 2 reappears"):
        packed_attention(q, keys, keys, seg, kv_segment_ids=kv_seg, validate=True)
    kv_seg = jnp.asarray([[2, 2, 2, 2, 2, 0]], jnp.int32)
    with pytest.raises(ValueError, match="kv_positions row 0, index 1"):
        packed_attention(q, keys, keys, seg, kv_segment_ids=kv_seg,
                         kv_positions=jnp.asarray([[3, 2, 4, 5, 6, 0]]), validate=True)  # fmt: skip


def test_cpu_default_is_xla_chunked_and_dispatch_falls_back(monkeypatch, rng):
    seg = cases.random_layout(rng, 1, 24)
    q, k, v = cases.qkv(rng, 1, 24, hq=2, hkv=1, d=8, dtype=jnp.float32)
    calls = []
    chunked = api.IMPLEMENTATIONS["xla_chunked"]

    def spy(*args, **kwargs):
        calls.append("xla_chunked")
        return chunked(*args, **kwargs)

    def refuses(*args, **kwargs):
        calls.append("refuses")
        raise NotImplementedError("cannot serve this call")

    monkeypatch.setitem(api.IMPLEMENTATIONS, "xla_chunked", spy)
    packed_attention(q, k, v, seg)
    assert calls == ["xla_chunked"]
    monkeypatch.setitem(api.IMPLEMENTATIONS, "refuses", refuses)
    monkeypatch.setitem(api.PREFERENCE, "cpu", ("refuses", "xla_chunked"))
    got = packed_attention(q, k, v, seg)
    assert calls[1:] == ["refuses", "xla_chunked"]
    want = reference_attention(q, k, v, seg)
    assert cases.relative_error(got, want) < 1e-5


def test_gpu_kernel_without_pallas_triton_falls_back(monkeypatch, rng):
    # JAX 0.11 deprecated the Pallas Triton backend: where it is gone, pallas_gpu refuses
    # with NotImplementedError and the dispatcher moves on.
    monkeypatch.setattr(pallas_gpu, "plgpu", None)
    monkeypatch.setattr(pallas_gpu, "_warned_unavailable", True)  # the warning: next test
    monkeypatch.setitem(api.PREFERENCE, "cpu", ("pallas_gpu", "xla_chunked"))
    seg = cases.random_layout(rng, 1, 24)
    q, k, v = cases.qkv(rng, 1, 24, hq=2, hkv=1, d=8, dtype=jnp.float32)
    with pytest.raises(NotImplementedError, match="triton"):
        packed_attention(q, k, v, seg, implementation="pallas_gpu")
    got = packed_attention(q, k, v, seg)
    assert cases.relative_error(got, reference_attention(q, k, v, seg)) < 1e-5


def test_gpu_kernel_without_pallas_triton_warns_once(monkeypatch, rng):
    # Falling back is never silent: the first refusal says why, later ones stay quiet.
    monkeypatch.setattr(pallas_gpu, "plgpu", None)
    monkeypatch.setattr(pallas_gpu, "_warned_unavailable", False)
    monkeypatch.setitem(api.PREFERENCE, "cpu", ("pallas_gpu", "xla_chunked"))
    seg = cases.random_layout(rng, 1, 24)
    q, k, v = cases.qkv(rng, 1, 24, hq=2, hkv=1, d=8, dtype=jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            packed_attention(q, k, v, seg)
    unavailable = [w for w in caught if "pallas_gpu is unavailable" in str(w.message)]
    assert len(unavailable) == 1, [str(w.message) for w in caught]
    assert unavailable[0].category is UserWarning
    assert "falls back to xla_chunked" in str(unavailable[0].message)
    assert unavailable[0].filename.endswith("dispatch.py")  # the caller, not pallas_gpu


def test_gpu_kernel_refuses_what_triton_cannot_compute(rng):
    q, k, v = cases.qkv(rng, 1, 32, hq=2, hkv=1, d=16, dtype=jnp.float32)
    with pytest.raises(NotImplementedError):
        packed_attention(*(x.astype(jnp.int8) for x in (q, k, v)), implementation="pallas_gpu")
    if pallas_gpu.plgpu is not None:
        with pytest.raises(ValueError, match="powers of two"):
            pallas_gpu.packed_attention_gpu(q, k, v, block_sizes=BlockSizes(block_q=24))


def test_merge_is_nan_free_where_parts_saw_nothing(rng):
    out = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
    lse = jnp.asarray([[[0.5, -jnp.inf], [-jnp.inf, -jnp.inf], [1.0, 2.0]]], jnp.float32)
    zero = (jnp.zeros_like(out), jnp.full(lse.shape, -jnp.inf))

    def merged(out, lse):
        o, m = merge_attention([(out, lse), zero])
        return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(m), m, 0.0))

    o, m = merge_attention([(out, lse), zero])
    np.testing.assert_allclose(np.asarray(o)[np.isfinite(lse)], np.asarray(out)[np.isfinite(lse)])
    assert np.all(np.asarray(o)[~np.isfinite(lse)] == 0)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(lse))
    grads = jax.grad(merged, argnums=(0, 1))(out, lse)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    with pytest.raises(ValueError, match="parts is empty"):
        merge_attention([])
    with pytest.raises(ValueError, match="part 1"):
        merge_attention([(out, lse), (out[:, :2], lse[:, :2])])


def test_cu_seqlens_round_trip(rng):
    seg = cases.random_layout(rng, 3, 40)
    cu, n = segment_ids_to_cu_seqlens(seg, max_segments=64)
    real = seg.reshape(-1)[seg.reshape(-1) != 0]
    starts = np.flatnonzero(np.diff(real, prepend=-1) != 0)  # runs of the flattened real tokens
    row_starts = np.cumsum([0] + [int(np.sum(r != 0)) for r in seg[:-1]])  # runs cut at rows
    want = np.union1d(starts, row_starts[row_starts < len(real)])
    assert int(n) == len(want)
    np.testing.assert_array_equal(np.asarray(cu)[: int(n)], want)
    assert np.all(np.asarray(cu)[int(n) :] == len(real))
    back = np.asarray(cu_seqlens_to_segment_ids(cu, len(real) + 5))[0]
    assert np.all(back[len(real) :] == 0)
    np.testing.assert_array_equal(
        np.diff(back[: len(real)]) != 0, np.isin(np.arange(1, len(real)), want)
    )


def test_self_attention_positions_given_on_one_side_stand_for_both(rng):
    # Per-document positions passed as q_positions only: in self-attention the keys are
    # the queries, so they get the same positions (not the index in the row).
    seg = cases.random_layout(rng, 2, 32)
    pos = cases.document_positions(seg)
    q, k, v = cases.qkv(rng, 2, 32, hq=2, hkv=1, d=8, dtype=jnp.float32)
    want = reference_attention(q, k, v, seg)
    for implementation in ("xla", "xla_chunked"):
        for side in ("q_positions", "kv_positions"):
            got = packed_attention(q, k, v, seg, implementation=implementation, **{side: pos})
            assert cases.relative_error(got, want) < 1e-6, (implementation, side)


def test_tpu_kernel_block_sizes_must_fill_lanes(rng):
    q, k, v = cases.qkv(rng, 1, 256, hq=2, hkv=1, d=128, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="block_kv=64 must be a multiple of 128"):
        packed_attention(q, k, v, implementation="pallas_tpu", block_sizes=BlockSizes(block_kv=64))
