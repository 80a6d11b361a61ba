"""Supervised fine-tuning: conversations in, loss weights through every packing strategy and
the ring layout, and a loss that weight-0 tokens cannot touch (issue 28 items 1 and 3)."""

import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcx.attention.ring import sequence_layout
from lcx.data import TokenizedCorpus
from lcx.data.conversations import (
    BAD_LINE,
    EMPTY_ASSISTANT,
    NO_ASSISTANT,
    read_conversations,
)
from lcx.errors import UserError
from lcx.model import Transformer, TransformerConfig
from lcx.packing import REGISTRY, packed_dataset
from lcx.packing.rows import packed_row
from lcx.train.chunkflow import chunkflow_loss_sum
from lcx.train.step import lm_loss
from tests.packing_options import options


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
}


def test_both_forms_are_read_in_order(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [CHAT, "", {"prompt": "2+2?", "completion": "4"}])
    got = read_conversations([path], skip_bad_lines=False)
    assert got.examples == [
        CHAT["messages"],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ]
    assert got.sources == [f"{path}:1", f"{path}:3"]
    assert got.skipped == {BAD_LINE: 0, NO_ASSISTANT: 0, EMPTY_ASSISTANT: 0}


@pytest.mark.parametrize(
    "line, what",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON object"),
        ({"text": "x"}, '"messages", or "prompt" and "completion"'),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] needs a role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"prompt": "x", "completion": None}, "both be strings"),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path, line, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT, line])
    with pytest.raises(UserError, match=f"bad.jsonl:2: .*{re.escape(what)}.*skip_bad_lines") as e:
        read_conversations([path], skip_bad_lines=False)
    assert "\n" not in str(e.value)


def test_skipped_lines_and_turnless_conversations_are_counted(tmp_path):
    no_reply = {"messages": [{"role": "user", "content": "hello?"}]}
    empty_reply = {"prompt": "x", "completion": "  "}
    lines = [CHAT, "{bad", no_reply, empty_reply, "[]", CHAT]
    got = read_conversations([write_jsonl(tmp_path / "c.jsonl", lines)], skip_bad_lines=True)
    assert len(got.examples) == 2
    assert got.skipped == {BAD_LINE: 2, NO_ASSISTANT: 1, EMPTY_ASSISTANT: 1}


def test_longer_conversations_are_dropped_whole_and_counted():
    lengths = [3, 9, 4, 12, 5]
    offsets = np.cumsum([0] + lengths)
    tokens = np.arange(offsets[-1], dtype=np.uint16)
    corpus = TokenizedCorpus(tokens, offsets, weights=(tokens % 2).astype(np.uint8))
    kept = corpus.without_longer_than(5)
    assert kept.lengths.tolist() == [3, 4, 5]
    assert kept.skipped == {"longer than seq_len": 2}
    for i, doc in enumerate((0, 2, 4)):
        np.testing.assert_array_equal(kept.document(i), corpus.document(doc))
        np.testing.assert_array_equal(kept.document_weights(i), corpus.document_weights(doc))
    assert corpus.without_longer_than(12) is corpus


def weighted_corpus(rng, documents=40, longest=50):
    """Tokens numbered 0..N-1 (each token names its place); weight = a fixed function of it."""
    lengths = rng.integers(2, longest, documents)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(offsets[-1], dtype=np.uint16)
    return TokenizedCorpus(tokens, offsets, weights=weight_of(tokens).astype(np.uint8))


def weight_of(tokens):
    return ((np.asarray(tokens) * 7) % 3 == 0).astype(np.float32)


@pytest.mark.parametrize("packing", sorted(REGISTRY))
def test_weights_travel_beside_every_token_in_every_strategy(packing, rng):
    corpus = weighted_corpus(rng)
    opts = options(packing, seq_len=64, batch_size=4, seed=1, num_epochs=1)
    batches = list(itertools.islice(iter(packed_dataset(corpus, opts)), 6))
    assert batches
    for batch in batches:
        real = batch["segment_ids"] != 0
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["weights"][real], weight_of(batch["tokens"][real]))
        assert not batch["weights"][~real].any()
        if REGISTRY[packing].whole_batches:
            continue  # no ring over whole-batch strategies (check_sequence_parallel)
        # The ring layout: each target carries its own token's weight.
        ring = sequence_layout(batch, shards=2, layout="balanced")
        mask = ring["target_mask"].astype(bool)
        np.testing.assert_array_equal(
            ring["target_weights"][mask], weight_of(ring["targets"][mask])
        )
        assert not ring["target_weights"][~mask].any()


def test_unweighted_corpora_keep_their_batches():
    corpus = TokenizedCorpus(np.arange(900, dtype=np.uint16), np.array([0, 60, 500, 900]))
    for packing in REGISTRY:
        batch = next(iter(packed_dataset(corpus, options(packing, seq_len=64, batch_size=2))))
        assert "weights" not in batch


CFG = TransformerConfig(
    vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return graphdef, nnx.to_pure_dict(params)


def loss_and_grads(graphdef, params, batch, average="token"):
    """Loss Σ/Σ and gradients through the model, one compiled program."""

    def mean(p):
        model = nnx.merge(graphdef, p)
        logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
        total, count = lm_loss(logits, batch, average)
        return total / count

    return jax.jit(jax.value_and_grad(mean))(params)


def conversations(rng, n=3):
    """n (tokens, weights) conversations: a user part (weight 0), then a reply (weight 1)."""
    out = []
    for _ in range(n):
        user, reply = rng.integers(2, 8), rng.integers(2, 8)
        tokens = rng.integers(0, 256, user + reply)
        out.append((tokens, np.r_[np.zeros(user), np.ones(reply)].astype(np.float32)))
    return out


def test_weight_zero_targets_change_neither_loss_nor_gradients(tiny, rng):
    graphdef, params = tiny
    convs = conversations(rng)
    row = packed_row([t for t, _ in convs], 40, 258, [w for _, w in convs])
    batch = {k: v[None] for k, v in row.items()}
    loss, grads = loss_and_grads(graphdef, params, batch)

    # The reference: the mean over only the weight-1 targets, picked by index, with no
    # weight-0 target in the computation at all.
    def reference(p):
        logits = nnx.merge(graphdef, p)(batch["tokens"], batch["segment_ids"], batch["positions"])
        seg = batch["segment_ids"][0]
        keep = np.flatnonzero((seg[:-1] == seg[1:]) & (seg[:-1] != 0) & (row["weights"][1:] > 0))
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits[0, keep], batch["tokens"][0, keep + 1]
        )
        return jnp.mean(ce)

    want, want_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), grads, want_grads
    )


def test_packed_rows_give_the_loss_of_the_conversations_alone(tiny, rng):
    graphdef, params = tiny
    convs = conversations(rng)
    packed = packed_row([t for t, _ in convs], 40, 258, [w for _, w in convs])
    alone = [packed_row([t], 40, 258, [w]) for t, w in convs]
    batches = {
        "packed": {k: np.stack([packed[k]] * 3) for k in packed},  # three identical rows
        "alone": {k: np.stack([r[k] for r in alone]) for k in packed},
    }
    batches["packed"]["segment_ids"][1:] = 0  # ... of which two are padding
    for average in ("token", "sequence"):
        (lp, gp), (la, ga) = (loss_and_grads(*tiny, batches[k], average) for k in batches)
        np.testing.assert_allclose(lp, la, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), gp, ga)


def test_token_and_sequence_averages_by_hand(rng):
    logits = jnp.asarray(rng.normal(size=(1, 8, 384)), jnp.float32)
    tokens = rng.integers(0, 256, (1, 8)).astype(np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    w = np.array([[0, 1, 1, 0, 0, 1, 0, 0]], np.float32)
    batch = {"tokens": tokens, "segment_ids": seg, "weights": w}
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], tokens[0, 1:]))
    total, count = lm_loss(logits, batch, "token")
    np.testing.assert_allclose(total, ce[0] + ce[1] + ce[4], rtol=1e-6)
    assert float(count) == 3
    total, count = lm_loss(logits, batch, "sequence")
    np.testing.assert_allclose(total, (ce[0] + ce[1]) / 2 + ce[4], rtol=1e-6)
    assert int(count) == 2


def test_chunkflow_rows_weight_their_targets(tiny, rng):
    """ChunkFlow's dependent-rows loss: the same Σ w·ce and Σ w as lm_loss on one row."""
    graphdef, params = tiny
    convs = conversations(rng)
    row = packed_row([t for t, _ in convs], 40, 258, [w for _, w in convs])
    batch = {k: v[None] for k, v in row.items()}
    batch["chunk_document"] = np.full((1, 1), -1, np.int32)
    got = jax.jit(chunkflow_loss_sum(graphdef))(params, batch)
    logits = nnx.merge(graphdef, params)(batch["tokens"], batch["segment_ids"], batch["positions"])
    want = lm_loss(logits, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert float(got[1]) == float(want[1])


def test_settings_name_what_is_valid():
    from configs.lm_tiny import get_config
    from lcx.settings import resolve

    for section, key, value, valid in (
        ("data", "format", "jsonl", "valid: ('text', 'chat')"),
        ("train", "loss_average", "mean", "valid: ('token', 'sequence')"),
        ("data", "sources", ({"paths": "x", "weight": 1.0},), "needs exactly the keys"),
        ("data", "sources", ({"paths": "x", "weight": 0.0, "min_tokens": 0},), "must be > 0"),
    ):
        config = get_config("smoke")
        config[section][key] = value
        with pytest.raises(UserError, match=re.escape(valid)) as e:
            resolve(config)
        assert f"{section}." in str(e.value) and "\n" not in str(e.value)


def test_chat_data_is_split_cached_and_counted(tmp_path):
    from configs.lm_tiny import get_config
    from lcx.data.sft import load_chat_split
    from lcx.settings import resolve

    lines = [CHAT] * 3 + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)] + ["{bad"]
    path = write_jsonl(tmp_path / "chats.jsonl", lines)
    config = get_config("smoke")
    config.data.update(format="chat", paths=path, skip_bad_lines=True, max_documents=0)
    config.data.eval_fraction = 0.3
    data = resolve(config).data
    from lcx.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    train, how = load_chat_split(data, "train", str(tmp_path), tokenizer)
    held, _ = load_chat_split(data, "eval", str(tmp_path), tokenizer)
    assert train.num_documents + held.num_documents == 33 and held.num_documents >= 1
    assert train.skipped[BAD_LINE] == 1 and how == "split by conversation"
    again, _ = load_chat_split(data, "train", str(tmp_path), tokenizer)  # from the cache
    assert os.listdir(tmp_path / "cache")
    np.testing.assert_array_equal(again.tokens, train.tokens)
    np.testing.assert_array_equal(again.weights, train.weights)
    assert again.skipped == train.skipped


@pytest.mark.parametrize("packing", ["concat_chunk", "dd"])
def test_chat_data_refuses_strategies_that_cut_documents(tmp_path, packing):
    from configs.lm_tiny import get_config
    from lcx.data import ByteTokenizer
    from lcx.settings import resolve
    from lcx.train.input import load_corpus

    config = get_config("smoke")
    config.data.update(format="chat", paths=write_jsonl(tmp_path / "c.jsonl", [CHAT] * 4))
    config.data.packing = packing
    with pytest.raises(UserError, match=f"data.packing='{packing}' cuts documents.*best_fit"):
        load_corpus(resolve(config).data, "train", None, ByteTokenizer(), 64)
