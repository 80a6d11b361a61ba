"""`data.sources`: corpora mixed row by row by weight (grain's mix), each packed on its own,
short documents of a source left out and counted (ProLong's long/short mix, issue 28)."""

import itertools

import numpy as np
import pytest

from lcx.data import TokenizedCorpus
from lcx.errors import UserError
from lcx.packing import mixed_dataset
from tests.packing_options import options


def corpus(first_token, lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(first_token + np.arange(offsets[-1], dtype=np.uint16), offsets)


@pytest.mark.parametrize("packing", ["first_fit", "ffd", "padded"])
def test_rows_follow_the_weights_and_never_mix_sources(packing, rng):
    long = corpus(0, rng.integers(40, 64, 30))  # tokens < 10_000
    short = corpus(10_000, rng.integers(2, 20, 200))
    opts = options(packing, seq_len=64, batch_size=5, seed=3)
    batches = list(itertools.islice(iter(mixed_dataset([(long, 0.6), (short, 0.4)], opts)), 20))
    sources = []
    for batch in batches:
        assert batch["tokens"].shape == (5, 64)
        for tokens, seg in zip(batch["tokens"], batch["segment_ids"], strict=True):
            real = tokens[seg != 0]
            assert (real < 10_000).all() or (real >= 10_000).all()  # one source per row
            sources.append(int(real[0] >= 10_000))
    assert abs(np.mean(sources) - 0.4) <= 0.05, np.mean(sources)


def test_whole_batch_strategies_and_bad_weights_are_refused():
    c = corpus(0, [30, 40])
    with pytest.raises(UserError, match="data.sources: data.packing='dd'"):
        mixed_dataset([(c, 1.0), (c, 1.0)], options("dd", seq_len=64, batch_size=4))
    with pytest.raises(UserError, match="must be positive"):
        mixed_dataset([(c, 1.0), (c, 0.0)], options("first_fit", seq_len=64, batch_size=4))


def test_short_documents_of_a_source_are_left_out_and_counted():
    c = corpus(0, [5, 50, 7, 80])
    kept = c.keep_documents(c.lengths >= 40, "shorter than min_tokens")
    assert kept.lengths.tolist() == [50, 80]
    assert kept.skipped == {"shorter than min_tokens": 2}
