"""LaCT's fast-weight memory: a per-head SwiGLU updated once per large chunk.

Large-chunk test-time training (Zhang et al., "Test-Time Training Done Right",
arXiv 2505.23884; reference a1600012888/LaCT, `lact_llm/lact_model/ttt_operation.py`).
The state is `f_W(x) = W1 (silu(W0 x) * (W2 x))` per head. Each chunk is first *applied*
(outputs use the weights carried from earlier chunks), then used to *update* them with
the chunk loss `L = -sum_i eta_i <f_W(k_i), v_i>` (one learning rate per token and per
weight), optional momentum, optional Muon (Newton-Schulz, 5 iterations; lcx scales the
orthogonalised update by the share of the chunk the document filled, 1 for full chunks
as in the reference) and a row re-normalisation to the initial norms.

Packed rows: the fast weights restart from their initial values at every document
boundary. Within a chunk, tokens of the document that began before it use the carried
weights, tokens of documents that begin inside it the initial weights; the update
carried to the next chunk uses only the tokens of the chunk's last document (the only
one that can continue), starting from that document's own weights and momentum.

Everything inside a chunk is a batched matrix product over [B, heads]; `lax.scan` runs
over chunks. The inner gradient is derived by hand (`descent_directions`): it saves the
nested autodiff and is checked against `jax.grad` in the tests.

Shape letters: B batch, N chunks, C chunk length, H fast-weight heads, D head dim,
F fast-weight hidden width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcx.attention.kernel_common import pad_length

# Newton-Schulz quintic coefficients of the reference (after Keller Jordan's Muon).
_NEWTON_SCHULZ_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
_RENORM_EPS = 1e-5


def safe_norm(x, axis, keepdims=True):
    """Euclidean norm whose gradient at 0 is 0, not NaN (all-padding chunks reach 0)."""
    sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    return jnp.sqrt(jnp.maximum(sum_sq, jnp.finfo(x.dtype).tiny))


class FastWeights(NamedTuple):
    """One SwiGLU per head: w0, w2 [..., H, F, D] (in), w1 [..., H, D, F] (out)."""

    w0: jax.Array
    w1: jax.Array
    w2: jax.Array


def apply_fast_weights(w: FastWeights, x_BxHxCxD):
    """f_W(x) = W1 (silu(W0 x) * (W2 x)) for every token, [B, H, C, D] -> [B, H, C, D]."""
    gate = jnp.einsum("bhcd,bhfd->bhcf", x_BxHxCxD, w.w0)
    hidden = jax.nn.silu(gate) * jnp.einsum("bhcd,bhfd->bhcf", x_BxHxCxD, w.w2)
    return jnp.einsum("bhcf,bhdf->bhcd", hidden, w.w1)


def descent_directions(w: FastWeights, k, v, lr0, lr1, lr2) -> FastWeights:
    """-dL/dW_j of L_j = -sum_i lr_j[i] <f_W(k_i), v_i>, by hand; k, v [B,H,C,D], lr [B,H,C]."""
    gate_pre = jnp.einsum("bhcd,bhfd->bhcf", k, w.w0)
    hidden_pre = jnp.einsum("bhcd,bhfd->bhcf", k, w.w2)
    sig = jax.nn.sigmoid(gate_pre)
    gate = gate_pre * sig
    hidden = gate * hidden_pre
    d_hidden = jnp.einsum("bhcd,bhdf->bhcf", v, w.w1)
    d_hidden_pre = d_hidden * gate
    d_gate_pre = d_hidden * hidden_pre * sig * (1 + gate_pre * (1 - sig))
    dw1 = jnp.einsum("bhcd,bhcf->bhdf", v, hidden * lr1[..., None])
    dw0 = jnp.einsum("bhcf,bhcd->bhfd", d_gate_pre * lr0[..., None], k)
    dw2 = jnp.einsum("bhcf,bhcd->bhfd", d_hidden_pre * lr2[..., None], k)
    return FastWeights(dw0, dw1, dw2)


def descent_directions_autodiff(w: FastWeights, k, v, lr0, lr1, lr2) -> FastWeights:
    """`descent_directions` by jax.vjp: one linearisation, one pullback per learning rate."""
    _, pullback = jax.vjp(lambda w: apply_fast_weights(w, k), w)
    dw0 = pullback(v * lr0[..., None])[0].w0
    dw1 = pullback(v * lr1[..., None])[0].w1
    dw2 = pullback(v * lr2[..., None])[0].w2
    return FastWeights(dw0, dw1, dw2)


INNER_GRADIENTS = {"hand": descent_directions, "autodiff": descent_directions_autodiff}


def newton_schulz(g):
    """Muon's orthogonalisation of the last two dims, 5 quintic iterations."""
    transpose = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if transpose else g
    x = x / (safe_norm(x, axis=(-2, -1)) + 1e-7)
    for a, b, c in _NEWTON_SCHULZ_COEFFS:
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return jnp.swapaxes(x, -1, -2) if transpose else x


def row_norms(w: FastWeights) -> FastWeights:
    """Norm of every row (over the last axis), kept for re-normalisation."""
    return jax.tree.map(lambda x: safe_norm(x, axis=-1), w)


def _renormalise(w: FastWeights, norms: FastWeights) -> FastWeights:
    """Every row rescaled to its initial norm."""

    def rescale(x, norm):
        return x / (safe_norm(x, axis=-1) + _RENORM_EPS) * norm

    return jax.tree.map(rescale, w, norms)


def where_rows(cond_B, a: FastWeights, b: FastWeights) -> FastWeights:
    """Per batch row: a where cond else b."""
    return jax.tree.map(lambda x, y: jnp.where(cond_B[:, None, None, None], x, y), a, b)


def document_start_index(segment_ids_BxT):
    """For every token, the index at which its run of equal segment ids starts."""
    t = segment_ids_BxT.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    change = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BxT[:, :1], bool),
            segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1],
        ],
        axis=1,
    )
    return jax.lax.cummax(jnp.where(change, idx, 0), axis=1)


def chunk_update(
    base: FastWeights,
    base_mom,
    k,
    v,
    lr,
    momentum,
    in_chunk,
    norms,
    *,
    chunk_size,
    use_muon,
    directions=descent_directions,
):
    """(weights, momentum) after one chunk's update from `base` (and its momentum).

    k, v [B, H, C, D]; lr [B, H, C, 3]; momentum [B, H, C] or None; `in_chunk` [B, 1, C]:
    1 for the tokens of the document being updated (the chunk's last), else 0; `norms`:
    the initial weights' row norms, restored after the step.
    """
    lr = lr * in_chunk[..., None]
    delta = directions(base, k, v, lr[..., 0], lr[..., 1], lr[..., 2])
    mom = None
    if base_mom is not None:
        count = jnp.maximum(jnp.sum(in_chunk, axis=-1), 1.0)  # [B, 1]
        coeff = jnp.sum(momentum * in_chunk, axis=-1) / count  # [B, H]
        delta = jax.tree.map(lambda d, m: d + m * coeff[..., None, None], delta, base_mom)
        mom = delta
    if use_muon:
        # Muon gives every update about unit size whatever its token count; scaling by
        # the share of the chunk the document filled keeps a document's few tokens at
        # the end of a chunk from moving the weights as far as a full chunk does.
        share = jnp.sum(in_chunk, axis=-1) / chunk_size  # [B, 1]
        delta = jax.tree.map(lambda d: newton_schulz(d) * share[..., None, None], delta)
    return _renormalise(jax.tree.map(jnp.add, base, delta), norms), mom


def _to_chunks(x, n, c):
    """[B, H, T, ...] with T = n * c -> [N, B, H, C, ...] for the scan."""
    b, h = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, h, n, c, *x.shape[3:]), 2, 0)


def _from_chunks(x):
    """[N, B, H, C, D] -> [B, H, N * C, D]."""
    n, b, h, c, d = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * c, d)


GRIDS = ("document", "row")


def lact_chunk_scan(
    w_init: FastWeights,
    q,
    k,
    v,
    lr,
    momentum,
    segment_ids,
    *,
    chunk_size,
    use_muon,
    inner_gradient="hand",
    grid="document",
):
    """Apply-then-update over chunks of packed rows; returns outputs [B, H, T, D].

    Args:
      w_init: the initial fast weights, [H, F, D] / [H, D, F] (shared by every row).
      q, k, v: [B, H, T, D] in the compute dtype; q, k L2-normalised by the caller.
      lr: [B, H, T, 3], per-token learning rates of W0, W1, W2 (positive).
      momentum: [B, H, T] momentum coefficients in [0, 1], or None for no momentum.
      segment_ids: int [B, T], 0 = padding; T need not be a multiple of the chunk.
      chunk_size: tokens per update.
      use_muon: orthogonalise every update with Newton-Schulz.
      inner_gradient: "hand" (derived, the default: see benchmarks/lact.py) or "autodiff".
      grid: "document": chunks counted from each document's first token, so a document
        packed at any offset equals the document alone (as the engine decodes it);
        "row": chunks on the row's grid (a document's first chunk is cut short where it
        starts mid-chunk; its update is scaled by the share it filled).

    Returns:
      [B, H, T, D]; 0 at padding tokens.
    """
    if inner_gradient not in INNER_GRADIENTS:
        raise ValueError(f"inner_gradient={inner_gradient!r}; valid: {sorted(INNER_GRADIENTS)}")
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r}; valid: {GRIDS}")
    directions = INNER_GRADIENTS[inner_gradient]
    b, h, t, _ = q.shape
    c = int(chunk_size)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        q, k, v, lr = (pad_length(x, n * c, axis=2) for x in (q, k, v, lr))
        if momentum is not None:
            momentum = pad_length(momentum, n * c, axis=2)
        segment_ids = pad_length(segment_ids, n * c, axis=1)
    real_BxT = segment_ids != 0
    index_T = jnp.arange(n * c, dtype=jnp.int32)
    chunk_start_T = (index_T // c) * c
    start_BxT = document_start_index(segment_ids)
    fresh_BxT = start_BxT >= chunk_start_T  # starts inside its chunk
    # Document grid: the token where a document's next chunk (and its next weights) begin.
    into_document = index_T - start_BxT
    boundary_BxT = real_BxT & (into_document > 0) & (into_document % c == 0)
    seg_NxBxC = jnp.moveaxis(segment_ids.reshape(b, n, c), 1, 0)
    fresh_NxBxC = jnp.moveaxis(fresh_BxT.reshape(b, n, c), 1, 0)
    real_NxBxC = jnp.moveaxis(real_BxT.reshape(b, n, c), 1, 0)

    # Fast-weight state, momentum, norms and learning rates stay float32 whatever the
    # compute dtype (the reference keeps its states in fp32 too); outputs are cast back.
    out_dtype = q.dtype
    dt = jnp.float32 if out_dtype != jnp.float64 else jnp.float64
    q, k, v = (x.astype(dt) for x in (q, k, v))
    w0 = FastWeights(*(jnp.broadcast_to(x.astype(dt), (b, *x.shape)) for x in w_init))
    norms = row_norms(w0)
    xs = dict(
        q=_to_chunks(q, n, c),
        k=_to_chunks(k, n, c),
        v=_to_chunks(v, n, c),
        lr=_to_chunks(lr.astype(dt), n, c),
        seg=seg_NxBxC,
        fresh=fresh_NxBxC,
        real=real_NxBxC,
        boundary=jnp.moveaxis(boundary_BxT.reshape(b, n, c), 1, 0),
    )
    if momentum is not None:
        xs["momentum"] = _to_chunks(momentum.astype(dt), n, c)

    def step(carry, x):
        """One chunk: outputs from carried/initial weights, then the last document's update."""
        w, mom = carry
        out_carried = apply_fast_weights(w, x["q"])
        out_fresh = apply_fast_weights(w0, x["q"])
        fresh = x["fresh"][:, None, :, None]
        out = jnp.where(fresh, out_fresh, out_carried) * x["real"][:, None, :, None]

        last_seg = x["seg"][:, -1]
        continues = ~x["fresh"][:, -1]  # the chunk's last document began before it
        in_last = ((x["seg"] == last_seg[:, None]) & x["real"]).astype(dt)[:, None, :]  # [B,1,C]
        base = where_rows(continues, w, w0)
        base_mom = None
        if mom is not None:
            base_mom = where_rows(continues, mom, jax.tree.map(jnp.zeros_like, mom))
        w, mom = chunk_update(
            base,
            base_mom,
            x["k"],
            x["v"],
            x["lr"],
            x.get("momentum"),
            in_last,
            norms,
            chunk_size=c,
            use_muon=use_muon,
            directions=directions,
        )
        return (w, mom), out

    def document_step(carry, x):
        """One row chunk on the document grid: the continuing document's weights switch at
        its chunk boundary (if one falls here), after an update over the c tokens before it
        (the end of the previous row chunk and the start of this one)."""
        w, mom, previous = carry
        fresh, real = x["fresh"], x["real"]
        crossing = x["boundary"] & ~fresh  # only the continuing document can cross here
        has_boundary = jnp.any(crossing, axis=-1)  # [B]
        at = jnp.where(has_boundary, jnp.argmax(crossing, axis=-1), c)  # [B]
        window = lambda name: jax.vmap(  # noqa: E731
            lambda both, start: jax.lax.dynamic_slice_in_dim(both, start, c, axis=1)
        )(jnp.concatenate([previous[name], x[name]], axis=2), at % c)
        names = ["k", "v", "lr"] + (["momentum"] if mom is not None else [])
        chunk = {name: window(name) for name in names}
        w_next, mom_next = chunk_update(
            w,
            mom,
            chunk["k"],
            chunk["v"],
            chunk["lr"],
            chunk.get("momentum"),
            jnp.ones((b, 1, c), dt),
            norms,
            chunk_size=c,
            use_muon=use_muon,
            directions=directions,
        )
        w_next = where_rows(has_boundary, w_next, w)
        after = jnp.arange(c)[None, :] >= at[:, None]  # [B, C]
        out = (
            jnp.where(
                fresh[:, None, :, None],
                apply_fast_weights(w0, x["q"]),
                jnp.where(
                    after[:, None, :, None],
                    apply_fast_weights(w_next, x["q"]),
                    apply_fast_weights(w, x["q"]),
                ),
            )
            * real[:, None, :, None]
        )
        last_fresh = fresh[:, -1]  # the next chunk continues a document that began here
        w = where_rows(last_fresh, w0, w_next)
        if mom is not None:
            mom_next = where_rows(has_boundary, mom_next, mom)
            mom = where_rows(last_fresh, jax.tree.map(jnp.zeros_like, mom), mom_next)
        return (w, mom, {name: x[name] for name in names}), out

    mom0 = None if momentum is None else jax.tree.map(jnp.zeros_like, w0)
    if grid == "row":
        _, out = jax.lax.scan(step, (w0, mom0), xs)
    else:
        first = {
            name: jnp.zeros_like(xs[name][0]) for name in ("k", "v", "lr", "momentum") if name in xs
        }
        _, out = jax.lax.scan(document_step, (w0, mom0, first), xs)
    return _from_chunks(out)[:, :, :t].astype(out_dtype)
