"""LaCT: the chunk scan against a naive loop, packing, causality, Muon, hand gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcx.ttt import (
    FastWeights,
    LaCTConfig,
    LaCTLayer,
    apply_fast_weights,
    descent_directions,
    lact_chunk_scan,
    newton_schulz,
)

NS_COEFFS = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _layout(rng, t, n_docs, gap_every=3):
    """A packed row of `n_docs` random-length documents, some gaps of padding."""
    cuts = np.sort(rng.choice(np.arange(1, t), n_docs, replace=False))
    row = np.zeros(t, np.int32)
    start = int(rng.integers(0, 3))
    for i, end in enumerate([*cuts[1:], t]):
        if i % gap_every == gap_every - 1:
            start += 1  # leave one padding token before this document
        row[start:end] = i + 1
        start = end
    return row


# ------------------------------------------------------------------ naive reference


def _swiglu(w, x):
    """f_W(x) for tokens x [n, D] with one head's weights."""
    w0, w1, w2 = w
    return (jax.nn.silu(x @ w0.T) * (x @ w2.T)) @ w1.T


def _naive_update(w, k, v, lr):
    """-grad of sum_i lr_j[i] * -<f(k_i), v_i>, per weight j, by jax.grad."""
    out = []
    for j in range(3):

        def loss(wj, j=j):
            ws = list(w)
            ws[j] = wj
            return jnp.sum(lr[:, j] * jnp.sum(_swiglu(ws, k) * v, axis=-1))

        out.append(jax.grad(loss)(w[j]))
    return out


def _naive_newton_schulz(g):
    """Newton-Schulz on one matrix, in numpy."""
    g = np.asarray(g, np.float64)
    tr = g.shape[0] > g.shape[1]
    x = g.T if tr else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in NS_COEFFS:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tr else x


def naive_lact(w_init, q, k, v, lr, momentum, seg, chunk_size, use_muon, grid="document"):
    """A plain loop over rows, heads, documents and the chunks each document touches.

    grid "document": chunks start at the document's first token; "row": at multiples of
    the chunk size in the row.
    """
    b, h, t, d = q.shape
    out = np.zeros((b, h, t, d))
    for row in range(b):
        ids = seg[row]
        starts = [s for s in range(t) if ids[s] != 0 and (s == 0 or ids[s - 1] != ids[s])]
        for s in starts:
            e = s
            while e < t and ids[e] == ids[s]:
                e += 1
            for head in range(h):
                w = [np.asarray(x[head], np.float64) for x in w_init]
                norms = [np.linalg.norm(x, axis=-1, keepdims=True) for x in w]
                mom = [np.zeros_like(x) for x in w]
                c0 = s if grid == "document" else (s // chunk_size) * chunk_size
                for cs in range(c0, e, chunk_size):
                    idx = slice(max(s, cs), min(e, cs + chunk_size))
                    out[row, head, idx] = _swiglu(w, q[row, head, idx])
                    if e <= cs + chunk_size:
                        break  # the document ends in this chunk: no later token needs W
                    dw = _naive_update(w, k[row, head, idx], v[row, head, idx], lr[row, head, idx])
                    dw = [np.asarray(x, np.float64) for x in dw]
                    if momentum is not None:
                        coeff = float(np.mean(momentum[row, head, idx], dtype=np.float64))
                        dw = [x + m * coeff for x, m in zip(dw, mom, strict=True)]
                        mom = dw
                    if use_muon:  # scaled by the tokens this document had in the chunk (row grid)
                        share = (idx.stop - idx.start) / chunk_size
                        dw = [_naive_newton_schulz(x) * share for x in dw]
                    w = [x + dx for x, dx in zip(w, dw, strict=True)]
                    w = [
                        x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5) * n
                        for x, n in zip(w, norms, strict=True)
                    ]
    return out


def _scan_inputs(rng, b, h, t, d, f):
    """Random fast weights and per-token inputs, q and k L2-normalised."""
    w = FastWeights(
        rng.standard_normal((h, f, d)) / np.sqrt(d),
        rng.standard_normal((h, d, f)) / np.sqrt(f),
        rng.standard_normal((h, f, d)) / np.sqrt(d),
    )
    q, k, v = (rng.standard_normal((b, h, t, d)) for _ in range(3))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    lr = rng.uniform(0.01, 0.5, (b, h, t, 3))
    momentum = rng.uniform(0, 1, (b, h, t))
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return FastWeights(*map(f32, w)), f32(q), f32(k), f32(v), f32(lr), f32(momentum)


@pytest.mark.parametrize("grid", ["document", "row"])
@pytest.mark.parametrize(
    "chunk_size,use_momentum,use_muon",
    [(4, True, True), (8, False, True), (16, True, False), (64, False, False)],
)
def test_chunk_scan_matches_naive_loop(chunk_size, use_momentum, use_muon, grid, rng):
    # t = 40 with ~5 documents of ~8 tokens: chunks smaller than, like and larger than the
    # documents; most documents start mid-chunk; T is not a multiple of 16 or 64.
    b, h, t, d, f = 2, 2, 40, 8, 12
    seg = np.stack([_layout(rng, t, 5), _layout(rng, t, 2)])
    w, q, k, v, lr, mom = _scan_inputs(rng, b, h, t, d, f)
    mom = mom if use_momentum else None
    f64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)  # noqa: E731
    with jax.enable_x64(True):  # both in float64: this checks the arithmetic, not rounding
        got = jax.jit(lact_chunk_scan, static_argnames=("chunk_size", "use_muon", "grid"))(
            FastWeights(*map(f64, w)), *map(f64, (q, k, v, lr, mom)), seg,
            chunk_size=chunk_size, use_muon=use_muon, grid=grid,
        )  # fmt: skip
        want = naive_lact(w, q, k, v, lr, mom, seg, chunk_size, use_muon, grid)
    assert got.dtype == jnp.float64
    assert _relative_error(got, want) < 1e-10
    assert np.all(np.asarray(got)[np.broadcast_to((seg == 0)[:, None, :], got.shape[:3])] == 0)


def test_hand_fast_weight_gradients_equal_jax_grad(rng):
    w, q, k, v, lr, _ = _scan_inputs(rng, 2, 3, 16, 8, 12)
    wb = FastWeights(*(jnp.broadcast_to(x, (2, *x.shape)) for x in w))
    got = descent_directions(wb, k, v, lr[..., 0], lr[..., 1], lr[..., 2])
    for j, name in enumerate(("w0", "w1", "w2")):

        def loss(wj, j=j):
            ws = list(wb)
            ws[j] = wj
            score = jnp.sum(apply_fast_weights(FastWeights(*ws), k) * v, axis=-1)
            return -jnp.sum(lr[..., j] * score)  # the chunk loss L_j

        want = -jax.grad(loss)(wb[j])
        assert _relative_error(getattr(got, name), want) < 1e-5, name


def test_newton_schulz_is_close_to_orthogonal(rng):
    for shape in [(3, 16, 16), (3, 16, 40), (3, 40, 16)]:
        # Random singular vectors, singular values spread over [0.05, 1] x a random scale:
        # five iterations lift every direction above 1/20 of the largest to about 1 (a
        # Gaussian square matrix can have a far smaller one, which Muon leaves small).
        k = min(shape[1:])
        u = np.linalg.qr(rng.standard_normal((shape[0], shape[1], k)))[0]
        v = np.linalg.qr(rng.standard_normal((shape[0], shape[2], k)))[0]
        s = rng.uniform(0.05, 1.0, (shape[0], k)) * rng.uniform(0.1, 10)
        g = np.einsum("bik,bk,bjk->bij", u, s, v).astype(np.float32)
        x = np.asarray(newton_schulz(jnp.asarray(g)))
        np.testing.assert_allclose(x[0], _naive_newton_schulz(g[0]), atol=1e-4)
        singular = np.linalg.svd(x, compute_uv=False)
        # The quintic is tuned for speed, not exactness: singular values land near 1.
        assert singular.min() > 0.6 and singular.max() < 1.25, f"{shape} {singular}"


# ----------------------------------------------------------------------- the layer


def _layer(chunk_size, *, window=8, seed=0, **kwargs):
    cfg = LaCTConfig(
        d_model=32, num_heads=2, fw_heads=2, chunk_size=chunk_size, window=window, **kwargs
    )
    return LaCTLayer(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def _apply(layer, x, seg, pos):
    """The layer's output, compiled once per shape (not op by op)."""
    return layer(x, seg, pos)


def _positions(seg):
    """Positions restarting at 0 at every run start."""
    pos = np.zeros_like(seg)
    for row in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[row, t] = pos[row, t - 1] + 1 if seg[row, t] == seg[row, t - 1] else 0
    return pos


def _fixed_layout(t, length, offset):
    """Documents of exactly `length` tokens back to back from `offset` (padding before)."""
    seg = np.zeros(t, np.int32)
    for i, start in enumerate(range(offset, t - length + 1, length)):
        seg[start : start + length] = i + 1
    return seg


@pytest.mark.parametrize(
    "layout,chunk_size",
    [
        ("random", 3),  # chunks shorter than the documents
        ("random", 64),  # one chunk longer than the row
        ("aligned", 8),  # chunk == document, documents start on chunk boundaries
        ("shifted", 8),  # chunk == document, every document starts mid-chunk
    ],
)
def test_packed_row_equals_each_document_alone(layout, chunk_size, rng):
    """Row grid: equal to the document at the same offset of an otherwise empty row."""
    t = 48
    if layout == "random":
        seg = _layout(rng, t, 5)[None]
    else:
        seg = _fixed_layout(t, 8, 0 if layout == "aligned" else 3)[None]
    pos = _positions(seg)
    layer = _layer(chunk_size, seed=int(rng.integers(1 << 16)), grid="row")
    x = jnp.asarray(rng.standard_normal((1, t, 32)), jnp.float32)
    packed = np.asarray(_apply(layer, x, seg, pos))
    for doc in np.unique(seg[seg != 0]):
        alone = np.where(seg == doc, seg, 0)  # the document in its own row, others padding
        got = np.asarray(_apply(layer, x, alone, pos))
        mask = seg[0] == doc
        err = _relative_error(packed[0, mask], got[0, mask])
        assert err < 1e-5, f"doc {doc}, {layout=}, {chunk_size=}"
        assert np.all(got[0, ~mask] == 0)
    assert np.all(packed[0, seg[0] == 0] == 0)


@pytest.mark.parametrize("chunk_size", [3, 8])
def test_document_grid_packed_equals_each_document_alone_at_the_row_start(chunk_size, rng):
    """Document grid: every document, packed at any offset, equals itself at offset 0."""
    t = 48
    seg = _layout(rng, t, 5)[None]
    pos = _positions(seg)
    layer = _layer(chunk_size, seed=int(rng.integers(1 << 16)))  # grid="document" default
    x = jnp.asarray(rng.standard_normal((1, t, 32)), jnp.float32)
    packed = np.asarray(_apply(layer, x, seg, pos))
    for doc in np.unique(seg[seg != 0]):
        where = np.flatnonzero(seg[0] == doc)
        n = len(where)
        alone_x = jnp.zeros_like(x).at[0, :n].set(x[0, where])
        alone_seg = np.zeros_like(seg)
        alone_seg[0, :n] = 1
        got = np.asarray(_apply(layer, alone_x, alone_seg, _positions(alone_seg)))
        err = _relative_error(packed[0, where], got[0, :n])
        assert err < 1e-5, f"doc {doc} at {where[0]}, {chunk_size=}"


def test_causal_through_gradients(rng):
    t = 24
    layer = _layer(5, window=6)
    x = jnp.asarray(rng.standard_normal((1, t, 32)), jnp.float32)
    seg = np.ones((1, t), np.int32)
    jacobian = np.asarray(jax.jit(jax.jacrev(lambda x: layer(x, seg)[0].sum(-1)))(x))
    for target in range(t):
        grad = jacobian[target, 0]
        assert np.all(grad[target + 1 :] == 0), f"{target=}"
        assert np.abs(grad[: target + 1]).sum(-1).min() > 0, f"{target=}"


def test_padding_gives_no_nan_in_values_or_gradients(rng):
    seg = np.asarray([[1] * 10 + [0] * 14, [0] * 24], np.int32)
    layer = _layer(4)
    x = jnp.asarray(rng.standard_normal((2, 24, 32)), jnp.float32)
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, seg) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)  # one program, not op by op
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    out = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x, seg))(params, x)
    assert np.all(np.asarray(out)[1] == 0)


def test_bad_config():
    with pytest.raises(ValueError, match="chunk_size"):
        LaCTConfig(d_model=32, chunk_size=0)
    with pytest.raises(ValueError, match="fw_heads"):
        LaCTConfig(d_model=32, fw_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        LaCTConfig(d_model=30, num_heads=4, fw_heads=2)
    with pytest.raises(ValueError, match="window"):
        LaCTConfig(d_model=32, window=0)


def test_scan_with_hand_or_autodiff_inner_gradients_agree_in_value_and_gradient(rng):
    seg = np.stack([_layout(rng, 24, 3)])
    w, q, k, v, lr, mom = _scan_inputs(rng, 1, 2, 24, 8, 8)
    # float64: Muon amplifies float32 rounding; this checks that the two are the same math.
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
        w, q, k, v, lr, mom = FastWeights(*map(f64, w)), *map(f64, (q, k, v, lr, mom))
        _hand_vs_autodiff(w, q, k, v, lr, mom, seg)


def _hand_vs_autodiff(w, q, k, v, lr, mom, seg):
    """Values and gradients of a scan loss with either inner gradient agree."""

    def loss(q, k, v, lr, inner_gradient):
        out = lact_chunk_scan(
            w, q, k, v, lr, mom, seg, chunk_size=5, use_muon=True, inner_gradient=inner_gradient
        )
        return jnp.sum(out * jnp.cos(out)), out

    results = {}
    for name in ("hand", "autodiff"):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
        results[name] = fn(q, k, v, lr, name)
    for got, want in zip(
        jax.tree.leaves(results["hand"]), jax.tree.leaves(results["autodiff"]), strict=True
    ):
        assert got.dtype == jnp.float64
        assert _relative_error(got, want) < 1e-10
    with pytest.raises(ValueError, match="inner_gradient"):
        lact_chunk_scan(w, q, k, v, lr, mom, seg, chunk_size=5, use_muon=True, inner_gradient="x")
