"""Packing accounting: every token of the corpus appears exactly once per epoch."""

import numpy as np
import pytest

from lcx.data import ByteTokenizer, select_documents, tokenize_documents
from lcx.packing import DocumentPieces, PipelineOptions, batch_stats, packed_dataset
from tests.packing_options import options

SEQ_LEN = 64


@pytest.fixture
def corpus(text_corpus):
    docs = select_documents([text_corpus], "train", eval_fraction=0.1)
    return tokenize_documents(docs, ByteTokenizer())


def _runs(segment_ids_row):
    """(start, end) of each maximal run of one non-zero id."""
    seg = np.asarray(segment_ids_row)
    change = np.flatnonzero(np.diff(seg)) + 1
    bounds = np.concatenate([[0], change, [len(seg)]])
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if seg[a] != 0]


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "padded"])
def test_every_token_exactly_once(corpus, packing):
    assert corpus.lengths.max() > SEQ_LEN, "fixture must contain documents longer than a row"
    opts = options(packing, seq_len=SEQ_LEN, batch_size=3, num_epochs=1, seed=7, pad_id=258)
    pieces_seen = []
    for batch in packed_dataset(corpus, opts):
        for tokens, seg, pos in zip(
            batch["tokens"], batch["segment_ids"], batch["positions"], strict=True
        ):
            assert np.all(tokens[seg == 0] == 258)
            ids = [seg[s] for s, _ in _runs(seg)]
            assert len(ids) == len(set(ids)), "a segment id reappears later in the row"
            for start, end in _runs(seg):
                np.testing.assert_array_equal(pos[start:end], np.arange(end - start))
                pieces_seen.append(tuple(tokens[start:end]))
    pieces = DocumentPieces(corpus, SEQ_LEN)
    expected = sorted(tuple(pieces[i]["tokens"]) for i in range(len(pieces)))
    assert sorted(pieces_seen) == expected
    # Pieces concatenate back to the whole corpus: long documents split, none dropped.
    total = sum(len(p) for p in pieces_seen)
    assert total == corpus.num_tokens
    assert len(pieces) > corpus.num_documents  # some documents were split


def test_pieces_are_consecutive(corpus):
    pieces = DocumentPieces(corpus, SEQ_LEN)
    assert np.all(pieces.ends - pieces.starts <= SEQ_LEN)
    assert np.all(pieces.ends > pieces.starts)
    np.testing.assert_array_equal(np.sort(pieces.starts)[1:], np.sort(pieces.ends)[:-1])


def test_packing_beats_padding(corpus):
    def padding(packing):
        opts = options(packing, seq_len=SEQ_LEN, batch_size=4, num_epochs=1)
        stats = [batch_stats(b) for b in packed_dataset(corpus, opts)]
        return 1 - sum(s["real_tokens"] for s in stats) / sum(
            len(b["tokens"]) * SEQ_LEN for b in packed_dataset(corpus, opts)
        )

    assert padding("first_fit") < padding("padded")


def test_bad_options():
    with pytest.raises(ValueError, match="data.packing"):
        PipelineOptions(seq_len=8, batch_size=2, pad_id=0, packing="zigzag")
    with pytest.raises(ValueError, match="seq_len"):
        options(seq_len=0, batch_size=2)
