"""Training on dependent chunks (ChunkFlow, arXiv 2503.02356): memory set by the chunk.

A long document runs as consecutive chunks of C tokens. Forward: chunk after chunk, each
attending to the keys/values of the earlier ones (`Transformer.chunk_logits`); only the
keys/values are kept. Backward (a `jax.custom_vjp`): the chunks in reverse order, each
recomputed from its inputs and pulled back with the cotangent of its loss and of its
keys/values (summed from the later chunks), which flows on into the earlier chunks.
Optimisation barriers order the chunks (each recomputation waits for its cotangent), so
that a memory-aware scheduler needs one chunk's activations at a time besides the
keys/values. The loss and gradients equal those of the whole document in one row.

Measured on the CPU backend (XLA's temp buffers for jax.grad, d_model 32, 2 layers):
4,096 tokens in chunks of 256 take 672 MiB against 1,806 MiB whole, but the figure
still grows with the document (189 MiB at 2,048), so XLA:CPU keeps more than one
chunk's scores live; accelerator schedulers are not measured here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _chunks(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    return [(s, min(length, s + chunk_size)) for s in range(0, length, chunk_size)]


def _chunk_loss_sum(graphdef, params, tokens_BxL, start, end, prefixes):
    """Summed next-token loss of tokens [start, end) and that chunk's (k, v) per layer."""
    b = tokens_BxL.shape[0]
    positions = jnp.broadcast_to(jnp.arange(start, end, dtype=jnp.int32), (b, end - start))
    model = nnx.merge(graphdef, params)
    logits, kvs = model.chunk_logits(tokens_BxL[:, start:end], positions, prefixes)
    targets = tokens_BxL[:, start + 1 : end + 1]  # the last chunk has one target fewer
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, : targets.shape[1]], targets)
    return jnp.sum(losses), kvs


def chunked_document_loss(graphdef, params, tokens_BxL, chunk_size: int):
    """Mean next-token loss of documents [B, L] trained as dependent chunks of chunk_size."""
    b, length = tokens_BxL.shape
    chunks = _chunks(length, chunk_size)
    count = b * (length - 1)

    def forward(params, tokens):
        """Loss sum and every chunk's (k, v) per layer, chunk after chunk."""
        total, past = 0.0, []
        for start, end in chunks:
            prefixes = [[kv[layer] for kv in past] for layer in range(_num_layers(past, params))]
            if past:  # start this chunk only after the previous one: one chunk live
                prefixes, total = jax.lax.optimization_barrier((prefixes, total))
            loss, kvs = _chunk_loss_sum(graphdef, params, tokens, start, end, prefixes)
            total, past = total + loss, [*past, kvs]
        return total, past

    @jax.custom_vjp
    def loss_sum(params, tokens):
        return forward(params, tokens)[0]

    def loss_sum_fwd(params, tokens):
        total, past = forward(params, tokens)
        return total, (params, tokens, past)

    def loss_sum_bwd(residuals, g):
        params, tokens, past = residuals
        grads = jax.tree.map(jnp.zeros_like, params)
        d_past = [jax.tree.map(jnp.zeros_like, kvs) for kvs in past]
        for i in reversed(range(len(chunks))):
            start, end = chunks[i]
            layers = len(past[i])
            prefixes = [[kv[layer] for kv in past[:i]] for layer in range(layers)]
            # Recompute only once this chunk's cotangent is complete: one chunk live.
            params_i, prefixes, d_kv = jax.lax.optimization_barrier((params, prefixes, d_past[i]))

            def f(params, prefixes, start=start, end=end):
                return _chunk_loss_sum(graphdef, params, tokens, start, end, prefixes)

            _, pullback = jax.vjp(f, params_i, prefixes)
            d_params, d_prefixes = pullback((g, d_kv))
            grads = jax.tree.map(jnp.add, grads, d_params)
            for layer in range(layers):
                for j in range(i):
                    d_past[j][layer] = jax.tree.map(jnp.add, d_past[j][layer], d_prefixes[layer][j])
        return grads, None

    loss_sum.defvjp(loss_sum_fwd, loss_sum_bwd)
    return loss_sum(params, tokens_BxL) / count


def _num_layers(past, params) -> int:
    """Layers of the model: from a previous chunk's state, else from the parameters."""
    if past:
        return len(past[0])
    return len(params["blocks"])


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
