"""Training on dependent chunks (ChunkFlow, arXiv 2503.02356): memory set by the chunk.

A long document runs as consecutive chunks of C tokens, each attending to the keys and
values of the earlier ones (`Transformer.chunk_logits`), with the loss and gradients of
the whole document in one row (tested). `chunked_document_loss` does it for whole
documents with scans and a custom VJP, keeping only the keys/values between chunks;
`chunkflow_loss_sum` is the training step's loss over a batch of ChunkFlow rows
(`lcx.packing.chunkflow`), where a document's chunks are consecutive rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _kv_buffer(graphdef, params, b: int, length: int):
    """Zero keys/values for every layer: [layers, 2, B, length, K, D]."""
    cfg = nnx.merge(graphdef, params).cfg
    shape = (cfg.num_layers, 2, b, length, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, cfg.compute_dtype)


def chunked_document_loss(graphdef, params, tokens_BxL, chunk_size: int):
    """Mean next-token loss of documents [B, L] trained as dependent chunks of chunk_size.

    Forward: a scan over the chunks filling a keys/values buffer of the whole document;
    chunk i attends to the buffer's first i * C positions and to itself. Backward (custom
    VJP): a reverse scan recomputing one chunk at a time and pulling back its loss and its
    keys/values' cotangent (accumulated from the later chunks) into the parameters and the
    earlier positions of the buffer. Scans run their steps one after another, so memory is
    the buffers plus one chunk's activations, whatever the document's length.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    b, length = tokens_BxL.shape
    if length < 2:
        raise ValueError(f"tokens_BxL: documents of {length} tokens have no next-token target")
    c = int(chunk_size)
    n = -(-length // c)
    padded = jnp.pad(tokens_BxL, [(0, 0), (0, n * c + 1 - length)])
    count = b * (length - 1)

    def chunk(params, buffer, i):
        """(summed loss, this chunk's keys/values [layers, 2, B, C, K, D]) of chunk i."""
        start = i * c
        tokens = jax.lax.dynamic_slice_in_dim(padded, start, c, axis=1)
        targets = jax.lax.dynamic_slice_in_dim(padded, start + 1, c, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
        visible = jnp.broadcast_to(jnp.arange(n * c) < start, (b, n * c))
        prefixes = [[(buffer[layer, 0], buffer[layer, 1])] for layer in range(buffer.shape[0])]
        model = nnx.merge(graphdef, params)
        logits, kvs = model.chunk_logits(tokens, positions, prefixes, prefix_visible_BxP=visible)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        has_target = (positions + 1 < length)[0]
        total = jnp.sum(jnp.where(has_target[None], losses, 0.0))
        return total, jnp.stack([jnp.stack(kv) for kv in kvs])

    def forward(params):
        def step(carry, i):
            buffer, total = carry
            loss, kv = chunk(params, buffer, i)
            buffer = jax.lax.dynamic_update_slice_in_dim(buffer, kv, i * c, axis=3)
            return (buffer, total + loss), None

        init = (_kv_buffer(graphdef, params, b, n * c), jnp.float32(0.0))
        (buffer, total), _ = jax.lax.scan(step, init, jnp.arange(n))
        return total, buffer

    @jax.custom_vjp
    def loss_sum(params):
        return forward(params)[0]

    def loss_sum_fwd(params):
        total, buffer = forward(params)
        return total, (params, buffer)

    def loss_sum_bwd(residuals, g):
        params, buffer = residuals

        def step(carry, i):
            grads, d_buffer = carry
            d_kv = jax.lax.dynamic_slice_in_dim(d_buffer, i * c, c, axis=3)
            _, pullback = jax.vjp(lambda p, buf: chunk(p, buf, i), params, buffer)
            d_params, d_buf = pullback((g, d_kv))
            return (jax.tree.map(jnp.add, grads, d_params), d_buffer + d_buf), None

        init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(buffer))
        (grads, _), _ = jax.lax.scan(step, init, jnp.arange(n), reverse=True)
        return (grads,)

    loss_sum.defvjp(loss_sum_fwd, loss_sum_bwd)
    return loss_sum(params) / count


def chunkflow_loss_sum(graphdef):
    """`loss_sum(params, batch) -> (summed loss, targets)` over a batch of ChunkFlow rows.

    Rows run in order, one at a time. A row with `chunk_document` d >= 0 attends to the
    keys/values of the earlier rows of the same batch from document d (its earlier
    chunks); rows of merged short documents (d = -1) attend within their own documents.
    Targets: as `lm_loss` within each row, plus the first token of the next row when it
    continues the same document. Each row is rematerialised in the backward pass.
    """

    def row_logits(params, tokens, positions, segment_ids, prefixes, prefix_visible):
        model = nnx.merge(graphdef, params)
        return model.chunk_logits(
            tokens, positions, prefixes, segment_ids_BxC=segment_ids,
            prefix_visible_BxP=prefix_visible,
        )  # fmt: skip

    row_logits = jax.checkpoint(row_logits)

    def loss_sum(params, batch):
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        doc = batch["chunk_document"][:, 0]
        rows, c = tokens.shape
        past, total, count = [], 0.0, 0
        for r in range(rows):
            layers = len(past[0]) if past else len(params["blocks"])
            prefixes = [[kv[layer] for kv in past] for layer in range(layers)]
            same = [(doc[j] == doc[r]) & (doc[r] >= 0) & (seg[j] != 0) for j in range(r)]
            visible = jnp.concatenate(same)[None] if same else jnp.zeros((1, 0), bool)
            logits, kvs = row_logits(
                params, tokens[r : r + 1], pos[r : r + 1], seg[r : r + 1], prefixes, visible
            )
            past.append(kvs)
            inside = (seg[r, :-1] == seg[r, 1:]) & (seg[r, :-1] != 0)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], tokens[r, 1:])
            total += jnp.sum(jnp.where(inside, losses, 0.0))
            count += jnp.sum(inside)
            if r + 1 < rows:  # the next row continues this document: one more target
                goes_on = (doc[r] >= 0) & (doc[r + 1] == doc[r]) & (seg[r, -1] != 0)
                goes_on &= seg[r + 1, 0] != 0
                edge = optax.softmax_cross_entropy_with_integer_labels(
                    logits[0, -1], tokens[r + 1, 0]
                )
                total += jnp.where(goes_on, edge, 0.0)
                count += goes_on.astype(jnp.int32)
        return total, count

    return loss_sum
