"""Model properties: documents in a packed row are isolated, attention is causal."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcx.model import MIXERS, Transformer, TransformerConfig
from lcx.train.chunkflow import chunked_document_loss, chunkflow_loss_sum
from lcx.train.step import lm_loss

CFG = TransformerConfig(
    vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
# One row: documents of 5, 7 and 3 tokens, then 3 padding.
SEGMENTS = np.array([[1] * 5 + [2] * 7 + [3] * 3 + [0] * 3], np.int32)
POSITIONS = np.array([list(range(5)) + list(range(7)) + list(range(3)) + [0] * 3], np.int32)


# The LaCT hybrid: fast weights updated every 4 tokens, so documents span chunks.
LACT = dict(block_pattern=("lact", "attention"), lact=dict(chunk_size=4, window=4))


@pytest.fixture(params=["attention", "lact_hybrid"])
def model(request, rng):
    cfg = CFG if request.param == "attention" else TransformerConfig(**{**CFG.__dict__, **LACT})
    return Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


@nnx.jit
def _logits(model, tokens, segment_ids=None, positions=None):
    """The model's logits, compiled once per shape (not op by op)."""
    return model(tokens, segment_ids, positions)


def _tokens(seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, SEGMENTS.shape), jnp.int32)


def test_logits_shape_and_finite(model):
    logits = _logits(model, _tokens(0), SEGMENTS, POSITIONS)
    assert logits.shape == (1, SEGMENTS.shape[1], CFG.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_changing_one_document_leaves_the_others(model):
    tokens = _tokens(1)
    changed = tokens.at[0, 5:12].set((tokens[0, 5:12] + 17) % 256)  # document 2 only
    before = _logits(model, tokens, SEGMENTS, POSITIONS)
    after = _logits(model, changed, SEGMENTS, POSITIONS)
    others = SEGMENTS[0] != 2
    np.testing.assert_array_equal(np.asarray(before)[0, others], np.asarray(after)[0, others])
    assert not np.allclose(np.asarray(before)[0, 5:12], np.asarray(after)[0, 5:12])


def test_packed_row_equals_documents_alone(model):
    tokens = _tokens(2)
    packed = np.asarray(_logits(model, tokens, SEGMENTS, POSITIONS))
    for start, end in [(0, 5), (5, 12), (12, 15)]:
        # Alone at the same offset, the rest padding: LaCT's chunks are fixed in the row.
        seg = np.where(SEGMENTS == SEGMENTS[0, start], SEGMENTS, 0)
        alone = np.asarray(_logits(model, tokens, seg, POSITIONS))
        np.testing.assert_allclose(packed[0, start:end], alone[0, start:end], rtol=2e-5, atol=2e-5)
        if model.cfg.block_pattern == ("attention",):  # attention alone at offset 0, too
            alone = np.asarray(_logits(model, tokens[:, start:end]))
            np.testing.assert_allclose(packed[0, start:end], alone[0], rtol=2e-5, atol=2e-5)


def test_causal_and_isolated_through_gradients(model):
    x = model.embed_tokens(_tokens(3))
    t_len = SEGMENTS.shape[1]

    def outputs(x):
        return model.logits_from_embeddings(x, SEGMENTS, POSITIONS)[0].sum(-1)

    jacobian = np.asarray(jax.jit(jax.jacrev(outputs))(x))  # [T, 1, T, E]
    for t in range(t_len):
        grad = jacobian[t, 0]
        touched = np.abs(grad).sum(-1) > 0
        seg = SEGMENTS[0]
        visible = (np.arange(t_len) <= t) & (seg == seg[t]) & (seg != 0)
        if seg[t] == 0:
            visible = np.arange(t_len) == t  # padding sees only itself (residual path)
        else:
            visible |= np.arange(t_len) == t
        assert not touched[~visible].any(), (
            f"position {t} depends on {np.where(touched & ~visible)}"
        )
        assert np.isfinite(grad).all()


def test_bfloat16_compute_keeps_float32_params():
    cfg = TransformerConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = _logits(model, _tokens(4), SEGMENTS, POSITIONS)
    assert logits.dtype == jnp.float32
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)


def test_block_pattern_builds_lact_layers():
    cfg = TransformerConfig(**{**CFG.__dict__, **LACT, "num_layers": 3})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    kinds = [type(block.attn).__name__ for block in model.blocks]
    assert kinds == ["LaCTLayer", "Attention", "LaCTLayer"]
    # Each layer's serving cache is its mixer record's type; the engine asks the records.
    caches = model.init_cache(2, 8)
    assert [type(c) for c in caches] == [MIXERS[cfg.mixer(i)].cache_type for i in range(3)]
    assert cfg.mixers_without("shared_prefix") == ["lact"] and cfg.chunk_grid() == 4
    assert CFG.mixers_without("ring") == [] and CFG.chunk_grid() == 0


def test_bad_model_config():
    with pytest.raises(ValueError, match="block_pattern"):
        TransformerConfig(block_pattern=("attention", "mamba"))
    with pytest.raises(ValueError, match="chunk_size"):
        TransformerConfig(block_pattern=("lact",), lact=dict(chunk_size=0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="model.dtype"):
        TransformerConfig(dtype="float8")


@pytest.mark.parametrize("window", [None, 12])
def test_dependent_chunks_equal_the_whole_document_in_loss_and_gradients(window, rng):
    # ChunkFlow: a 40-token document in chunks of 16, 16, 8, each attending the earlier
    # chunks' keys/values, trains exactly like the document in one row (a window of 12
    # reaches back into the previous chunk).
    cfg = dataclasses.replace(CFG, attention_window=window)
    model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 40)), jnp.int32)

    def whole(params):
        logits = nnx.merge(graphdef, params)(tokens)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return jnp.mean(losses)

    def chunked(params):
        return chunked_document_loss(graphdef, params, tokens, 16)

    want, want_grads = jax.jit(jax.value_and_grad(whole))(params)
    got, got_grads = jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-7
    lact = Transformer(TransformerConfig(**{**CFG.__dict__, **LACT}), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="LaCT"):
        chunked_document_loss(*nnx.split(lact), tokens, 16)


def test_chunkflow_batch_loss_equals_documents_trained_whole(rng):
    # Rows: two short documents merged; a 40-token document as chunks 0, 1, 2 (16 tokens
    # each, the last 8 then padding); an empty row. Summed losses, targets and gradients
    # equal those of the documents in whole rows.
    model = Transformer(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, params = nnx.split(model)
    c, long_len = 16, 40
    doc = rng.integers(0, 256, long_len)
    tokens = np.zeros((5, c), np.int32)
    seg = np.zeros((5, c), np.int32)
    pos = np.zeros((5, c), np.int32)
    tokens[0, :13] = rng.integers(0, 256, 13)
    seg[0, :5], seg[0, 5:13] = 1, 2
    pos[0, :5], pos[0, 5:13] = np.arange(5), np.arange(8)
    for i in range(3):
        part = doc[i * c : (i + 1) * c]
        tokens[1 + i, : len(part)], seg[1 + i, : len(part)] = part, 1
        pos[1 + i, : len(part)] = i * c + np.arange(len(part))
    batch = {
        "tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos), "chunk_document": jnp.asarray([[-1], [7], [7], [7], [-1]]),
    }  # fmt: skip
    loss_sum = chunkflow_loss_sum(graphdef)

    def whole(params):
        m = nnx.merge(graphdef, params)
        merged = {"tokens": batch["tokens"][:1], "segment_ids": batch["segment_ids"][:1]}
        a, na = lm_loss(m(merged["tokens"], merged["segment_ids"], batch["positions"][:1]), merged)
        long = {"tokens": jnp.asarray(doc[None], jnp.int32)}
        long["segment_ids"] = jnp.ones((1, long_len), jnp.int32)
        b, nb = lm_loss(m(long["tokens"]), long)
        return a + b, na + nb

    (want, want_n), want_g = jax.jit(jax.value_and_grad(whole, has_aux=True))(params)
    (got, got_n), got_g = jax.jit(jax.value_and_grad(loss_sum, has_aux=True))(params, batch)
    assert int(got_n) == int(want_n) == 4 + 7 + long_len - 1
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-7


def test_dependent_chunks_need_memory_linear_in_the_document():
    # XLA's temp buffers for the gradient: whole rows through the dense reference attention
    # grow with L^2, chunks of 128 with L.
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    dense = dataclasses.replace(CFG, attention_implementation="xla")
    dense_graphdef = nnx.split(Transformer(dense, rngs=nnx.Rngs(0)))[0]

    def temp_bytes(loss, length):
        tokens = jnp.zeros((1, length), jnp.int32)
        compiled = jax.jit(jax.grad(lambda p: loss(p, tokens))).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def whole(params, tokens):
        logits = nnx.merge(dense_graphdef, params)(tokens)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return jnp.mean(losses)

    def chunked(params, tokens):
        return chunked_document_loss(graphdef, params, tokens, 128)

    small, large = temp_bytes(chunked, 1024), temp_bytes(chunked, 2048)
    assert large < 2.5 * small  # linear in L (the chunk's scores are C x L), not quadratic
    assert large < 0.2 * temp_bytes(whole, 2048)


def _loss_and_grads(rng_seed, **fields):
    """Mean next-token loss and its gradients for a tiny model on a packed batch."""
    cfg = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64, **fields)  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(rng_seed)
    seg = np.repeat(np.array([[1, 1, 2, 3], [4, 4, 4, 0]]), 8, axis=1).astype(np.int32)
    pos = np.concatenate([np.arange(16), np.arange(8), np.arange(8)])[None].repeat(2, 0)
    batch = dict(tokens=jnp.asarray(rng.integers(0, 64, (2, 32))), segment_ids=jnp.asarray(seg),
                 positions=jnp.asarray(pos, jnp.int32))  # fmt: skip

    def loss(params):
        logits = nnx.merge(graphdef, params)(batch["tokens"], batch["segment_ids"],
                                             batch["positions"])  # fmt: skip
        total, count = lm_loss(logits, batch)
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    "pattern, fields",
    [(("attention",), dict(scan_layers=True)), (("attention",), dict(remat="full")),
     (("attention",), dict(remat="dots")), (("attention",), dict(remat="offload")),
     (("attention", "lact"), dict(scan_layers=True, remat="dots"))],
    ids=["scan", "full", "dots", "offload", "hybrid-scan-dots"],
)  # fmt: skip
def test_scanned_layers_and_every_remat_policy_give_the_loop_gradients(rng, pattern, fields):
    layers = dict(num_layers=2) if pattern == ("attention",) else dict(
        num_layers=4, lact=dict(chunk_size=8, window=8))  # fmt: skip
    seed = int(rng.integers(2**31))
    want_loss, want = _loss_and_grads(seed, block_pattern=pattern, **layers)
    loss, grads = _loss_and_grads(seed, block_pattern=pattern, **layers, **fields)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads, want)
