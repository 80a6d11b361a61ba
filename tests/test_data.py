"""Corpus discovery, byte tokenizer, split, tensorstore cache and bad input files."""

import os

import numpy as np
import pytest

from lcx.data import (
    ByteTokenizer,
    load_or_tokenize,
    select_documents,
    split_of,
    stdlib_documents,
    tokenize_documents,
)


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    data = bytes(range(256)) + "héllo ☃".encode()
    ids = tok.encode(data)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == data
    assert tok.vocab_size % 128 == 0 and tok.vocab_size > tok.pad_id


def test_default_corpus_is_the_stdlib():
    docs = stdlib_documents()
    assert len(docs) > 500
    assert all(d.path.endswith(".py") for d in docs)
    assert not any("site-packages" in d.path for d in docs)


def test_split_is_deterministic_and_disjoint(text_corpus):
    train = select_documents([text_corpus], "train", eval_fraction=0.3)
    evals = select_documents([text_corpus], "eval", eval_fraction=0.3)
    assert {d.relpath for d in train}.isdisjoint({d.relpath for d in evals})
    assert len(train) + len(evals) == 30
    assert split_of("a/b.py", 0.5) == split_of("a/b.py", 0.5)


def test_bad_files_are_handled(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    docs = select_documents([str(tmp_path)], "train", eval_fraction=1e-9)
    corpus = tokenize_documents(docs, ByteTokenizer())
    assert corpus.num_empty_skipped == 1 and corpus.num_binary_skipped == 2
    assert corpus.num_documents == 1 and corpus.num_tokens == 4 + 2  # latin1.txt
    kept = tokenize_documents(docs, ByteTokenizer(), keep_binary=True)  # byte-level work
    assert kept.num_binary_skipped == 0 and kept.num_documents == 3
    assert kept.num_tokens == (768 + 2) + (4 + 2) + (16 + 64 + 2)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        select_documents([str(tmp_path / "nope")], "train", eval_fraction=0.1)


def test_only_empty_files_is_refused(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    docs = select_documents([str(tmp_path)], "train", eval_fraction=1e-9)
    with pytest.raises(ValueError, match="no documents to train on"):
        tokenize_documents(docs, ByteTokenizer())


def test_cache_is_written_once_and_read_back(text_corpus, tmp_path, monkeypatch):
    docs = select_documents([text_corpus], "train", eval_fraction=0.1)
    cache = str(tmp_path / "cache")
    first = load_or_tokenize(docs, ByteTokenizer(), cache)
    (entry,) = os.listdir(cache)
    assert os.path.exists(os.path.join(cache, entry, "tokens"))

    def fail(*a, **k):
        raise AssertionError("tokenized again despite a cache")

    monkeypatch.setattr("lcx.data.store.tokenize_documents", fail)
    second = load_or_tokenize(docs, ByteTokenizer(), cache)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    np.testing.assert_array_equal(first.offsets, second.offsets)
