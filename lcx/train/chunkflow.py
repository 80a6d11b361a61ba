"""Training on dependent chunks (ChunkFlow, arXiv 2503.02356): memory set by the chunk.

Rows of C tokens run in order; a row of document d >= 0 attends to the keys/values of the
earlier rows of document d (its earlier chunks, which must be the rows just before it)
and, within itself, causally within each document (rows of merged short documents have
d = -1 and see only themselves). Each row's attention is one `packed_attention` call of
its queries against the keys/values buffer of all rows, with the keys it may not see
given segment id 0, so the blocked implementations skip them. Targets
are next tokens within a row, plus the first token of the next row when it continues
the same document, so a document cut into chunks has exactly the targets, loss and
gradients of the whole document in one row (tested).

`dependent_rows_loss_sum` is the engine: forward, a scan over the rows filling a
keys/values buffer; backward (a custom VJP), a reverse scan recomputing one row at a time
and pulling back its loss and its keys/values' cotangent (accumulated from the later
rows) into the parameters and the earlier rows. Scans run their steps one after another,
so memory is the buffers plus one row's activations: linear in the total length.
`chunked_document_loss` applies it to whole documents, `chunkflow_loss_sum` to a
training batch of ChunkFlow rows (`lcx.packing.chunkflow`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def target_mask(segment_ids_RxC, document_R):
    """(within [R, C-1], across [R]): which next-token targets exist."""
    seg, doc = segment_ids_RxC, document_R
    within = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)
    nxt = jnp.concatenate([doc[1:], jnp.full((1,), -1, doc.dtype)])
    first_next = jnp.concatenate([seg[1:, 0], jnp.zeros((1,), seg.dtype)])
    across = (doc >= 0) & (nxt == doc) & (seg[:, -1] != 0) & (first_next != 0)
    return within, across


def dependent_rows_loss_sum(
    graphdef, params, tokens_RxC, segment_ids_RxC, positions_RxC, document_R, weights_RxC=None
):
    """(summed next-token loss, target count) of rows run as dependent chunks, in order;
    with `weights_RxC` (conversations: lcx.posttrain.sft) each target counts by its
    token's weight: (Σ w·ce, Σ w)."""
    rows, c = tokens_RxC.shape
    cfg = nnx.merge(graphdef, params).cfg
    within, across = target_mask(segment_ids_RxC, document_R)
    if weights_RxC is None:
        count = jnp.sum(within) + jnp.sum(across)
    else:
        next_weight = jnp.concatenate([weights_RxC[1:, 0], jnp.zeros((1,), weights_RxC.dtype)])
        within = jnp.where(within, weights_RxC[:, 1:], 0.0)
        across = jnp.where(across, next_weight, 0.0)
        count = jnp.sum(within) + jnp.sum(across)
    key_row = jnp.arange(rows * c) // c
    key_ids, key_positions = segment_ids_RxC.reshape(1, -1), positions_RxC.reshape(1, -1)
    next_first = jnp.concatenate([tokens_RxC[1:, 0], jnp.zeros((1,), tokens_RxC.dtype)])

    def row(params, buffer, r):
        """Summed loss of row r and its keys/values [layers, 2, 1, C, K, D]."""
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, r, 1, axis=0)  # noqa: E731
        tokens, seg, pos = take(tokens_RxC), take(segment_ids_RxC), take(positions_RxC)
        doc = document_R[r]
        # Keys row r sees: its own, and its document's earlier chunks (consecutive rows,
        # so each document stays one contiguous run of keys).
        earlier = (key_row < r) & (document_R[key_row] == doc) & (doc >= 0)
        cache_ids = jnp.where((key_row == r) | earlier, key_ids, 0)
        caches = [(buffer[layer, 0], buffer[layer, 1]) for layer in range(cfg.num_layers)]
        logits, kvs = nnx.merge(graphdef, params).chunk_logits(
            tokens,
            seg,
            pos,
            caches,
            cache_segment_ids=cache_ids,
            cache_positions=key_positions,
            index=r * c,
        )
        inside = optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], tokens[0, 1:])
        edge = optax.softmax_cross_entropy_with_integer_labels(logits[0, -1], next_first[r])
        if weights_RxC is None:
            total = jnp.sum(jnp.where(take(within)[0], inside, 0.0))
            total += jnp.where(across[r], edge, 0.0)
        else:  # a weight-0 target adds nothing, not even 0 * a non-finite loss
            w_in, w_edge = take(within)[0], across[r]
            total = jnp.sum(jnp.where(w_in != 0, inside * w_in, 0.0))
            total += jnp.where(w_edge != 0, edge * w_edge, 0.0)
        return total, jnp.stack([jnp.stack(kv) for kv in kvs])

    def forward(params):
        def step(carry, r):
            buffer, total = carry
            loss, kv = row(params, buffer, r)
            buffer = jax.lax.dynamic_update_slice_in_dim(buffer, kv, r * c, axis=3)
            return (buffer, total + loss), None

        shape = (cfg.num_layers, 2, 1, rows * c, cfg.num_kv_heads, cfg.head_dim)
        init = (jnp.zeros(shape, cfg.compute_dtype), jnp.float32(0.0))
        (buffer, total), _ = jax.lax.scan(step, init, jnp.arange(rows))
        return total, buffer

    @jax.custom_vjp
    def loss_sum(params):
        return forward(params)[0]

    def loss_sum_fwd(params):
        total, buffer = forward(params)
        return total, (params, buffer)

    def loss_sum_bwd(residuals, g):
        params, buffer = residuals

        def step(carry, r):
            grads, d_buffer = carry
            d_kv = jax.lax.dynamic_slice_in_dim(d_buffer, r * c, c, axis=3)
            _, pullback = jax.vjp(lambda p, buf: row(p, buf, r), params, buffer)
            d_params, d_buf = pullback((g, d_kv))
            return (jax.tree.map(jnp.add, grads, d_params), d_buffer + d_buf), None

        init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(buffer))
        (grads, _), _ = jax.lax.scan(step, init, jnp.arange(rows), reverse=True)
        return (grads,)

    loss_sum.defvjp(loss_sum_fwd, loss_sum_bwd)
    return loss_sum(params), count


def chunked_document_loss(graphdef, params, tokens_BxL, chunk_size: int):
    """Mean next-token loss of documents [B, L] trained as dependent chunks of chunk_size."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    b, length = tokens_BxL.shape
    if length < 2:
        raise ValueError(f"tokens_BxL: documents of {length} tokens have no next-token target")
    c = int(chunk_size)
    n = -(-length // c)
    padded = jnp.pad(tokens_BxL, [(0, 0), (0, n * c - length)])
    real = jnp.arange(n * c) < length
    rows = lambda x: x.reshape(b * n, c)  # noqa: E731
    segment_ids = jnp.broadcast_to(real.astype(jnp.int32), (b, n * c))
    positions = jnp.broadcast_to(jnp.arange(n * c, dtype=jnp.int32), (b, n * c))
    document = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
    total, count = dependent_rows_loss_sum(
        graphdef, params, rows(padded), rows(segment_ids), rows(positions), document
    )
    return total / count


def chunkflow_loss_sum(graphdef):
    """`loss_sum(params, batch) -> (summed loss, targets)` over a batch of ChunkFlow rows."""

    def loss_sum(params, batch):
        return dependent_rows_loss_sum(
            graphdef,
            params,
            batch["tokens"],
            batch["segment_ids"],
            batch["positions"],
            batch["chunk_document"][:, 0],
            batch.get("weights"),
        )

    return loss_sum
