"""Hugging Face tokenizer.json files: exact round trips, uint32 token caches, training."""

import io
import json
import os

import numpy as np
import pytest

from lcx.data import HFTokenizer, load_or_tokenize, stdlib_documents
from lcx.data.store import tokenize_documents
from lcx.settings import resolve
from lcx.train.model_source import model_config


def _train_bpe(directory, texts, vocab_size=1000):
    """A byte-level BPE tokenizer trained here with <s> / </s>, saved as Hugging Face does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    return directory


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    docs = stdlib_documents()[::20]
    texts = [open(d.path, "rb").read().decode("utf-8", "replace") for d in docs]
    return _train_bpe(str(tmp_path_factory.mktemp("bpe")), texts)


def test_trained_tokenizer_round_trips_the_embedded_corpus_exactly(bpe_dir):
    """Every file that is not valid UTF-8 and every fourth of the rest (all 1,790 files
    take 12 s of BPE encoding)."""
    tokenizer = HFTokenizer(bpe_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    docs = stdlib_documents()
    not_utf8 = 0
    for i, doc in enumerate(docs):
        data = open(doc.path, "rb").read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
        else:
            if i % 4:
                continue
        ids = tokenizer.encode(data)
        assert ids.dtype == np.uint16 and ids[0] == 0 and ids[-1] == 1
        assert tokenizer.decode(ids) == data, doc.relpath
    assert len(docs) > 1000 and not_utf8 > 0  # invalid UTF-8 files round-trip too
    # Byte tokens at the same cost as a byte tokenizer at worst, far fewer on code.
    data = open(docs[0].path, "rb").read()
    assert len(tokenizer.encode(data)) < 0.6 * len(data)


def test_token_cache_keeps_ids_above_65535(tmp_path, rng):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    json.dump(
        {"bos_token": "<s>", "eos_token": "</s>"}, open(tmp_path / "tokenizer_config.json", "w")
    )
    # One id past uint16's range whatever the seed (50 random picks miss it 4% of the time).
    picked = np.concatenate([rng.choice(len(words), 49), rng.integers(65_536 - 3, len(words), 1)])
    rng.shuffle(picked)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(words[i] for i in picked))
    from lcx.data.corpus import user_documents

    docs = user_documents([str(tmp_path / "corpus")])
    hf = HFTokenizer(str(tmp_path))
    written = load_or_tokenize(docs, hf, str(tmp_path / "cache"))
    read = load_or_tokenize(docs, hf, str(tmp_path / "cache"))  # from the zarr cache
    expected = np.concatenate([[1], picked + 3, [2]])
    assert written.tokens.dtype == np.uint32 and read.tokens.dtype == np.uint32
    np.testing.assert_array_equal(read.tokens, expected)
    assert read.tokens.max() > 65_535


def test_training_with_a_tokenizer_json_runs_end_to_end(bpe_dir, smoke_config, tmp_path):
    from lcx.train import train_and_evaluate

    c = smoke_config
    c.data.tokenizer = bpe_dir
    with pytest.raises(ValueError, match=r"tokenizer.json: the tokenizer's vocabulary of 1000 "
                       r"tokens exceeds the model's vocab_size=384"):  # fmt: skip
        model_config(resolve(c))
    c.model.vocab_size = 1024
    record = train_and_evaluate(c, str(tmp_path))
    assert record["step"] == c.train.steps and np.isfinite(record["loss"])
    corpus = [d for d in os.listdir(tmp_path / "cache") if d.startswith("corpus-")]
    assert corpus  # tokenized with the BPE tokenizer, cached
    # Generation reads and writes text through the same tokenizer.
    from lcx.modes.generate import generate_from_workdir

    c.generate.update(prompts="def \\nclass ", max_new_tokens=6, slots=2, token_budget=16)
    out = io.StringIO()
    result = generate_from_workdir(c, str(tmp_path), out=out)
    assert result["prompts"] == 2 and 2 <= result["tokens"] <= 12
    text = out.getvalue()
    assert "--- 0: def " in text and "--- 1: class " in text


def test_bad_tokenizer_settings_fail_in_one_line(bpe_dir, tmp_path, smoke_config):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match=r"data.add_bos=True but .* names no bos_token"):
        HFTokenizer(str(tmp_path))
    assert HFTokenizer(str(tmp_path), add_bos=False, add_eos=False).pad_id == 0
    with pytest.raises(ValueError, match=r"holds no tokenizer.json"):
        HFTokenizer(str(tmp_path / "nowhere"))
    smoke_config.data.tokenizer = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"data.tokenizer=.*missing'; valid: "):
        model_config(resolve(smoke_config))


def test_joined_directories_make_long_documents(tmp_path):
    from lcx.data import ByteTokenizer
    from lcx.data.corpus import user_documents

    for name, text in {"top.py": "t", "pkg/a.py": "aa", "pkg/sub/b.py": "bbb"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    docs = user_documents([str(tmp_path)])
    joined = tokenize_documents(docs, ByteTokenizer(), join_directories=True)
    assert sorted(joined.lengths) == [1 + 1 + 1, 2 + 1 + 3 + 2]  # "aa\nbbb" and "t"
    assert tokenize_documents(docs, ByteTokenizer()).num_documents == 3
