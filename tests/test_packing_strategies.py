"""Packing strategies: FFD, binary decomposition, Dataset Decomposition, accounting, resume."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx.data.store import TokenizedCorpus
from lcx.packing import PipelineOptions, binary_decomposition, first_fit_decreasing, packed_dataset
from lcx.packing.decomposition import DecomposedDataset, DecompositionOptions
from tests.packing_options import options

SEQ_LEN = 64


def _unique_corpus(lengths) -> TokenizedCorpus:
    """Documents of the given lengths whose tokens are their global indices (all distinct)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(tokens=np.arange(offsets[-1], dtype=np.int64), offsets=offsets)


# ----------------------------------------------------------------------------------- FFD


@pytest.mark.parametrize("n,capacity", [(1, 10), (500, 64), (3000, 1000), (20000, 4096)])
def test_ffd_fits_uses_each_index_once_and_is_near_optimal(n, capacity, rng):
    lengths = rng.integers(1, capacity + 1, n) if n > 1 else np.asarray([capacity])
    if n == 20000:  # many short items, as documents are
        lengths = np.minimum(rng.geometric(8 / capacity, n), capacity)
    bins = first_fit_decreasing(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(n))
    assert all(lengths[b].sum() <= capacity for b in bins)
    lower = max(math.ceil(lengths.sum() / capacity), int(np.sum(lengths > capacity / 2)))
    assert len(bins) <= 11 / 9 * lower + 1, (len(bins), lower)


def test_ffd_matches_a_quadratic_first_fit(rng):
    lengths = rng.integers(1, 50, 300)
    remaining, want = [], []
    for i in np.argsort(-lengths, kind="stable"):
        for b, room in enumerate(remaining):
            if room >= lengths[i]:
                remaining[b] -= lengths[i]
                want[b].append(int(i))
                break
        else:
            remaining.append(50 - int(lengths[i]))
            want.append([int(i)])
    assert first_fit_decreasing(lengths, 50) == want


def test_ffd_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([1, 2], 0)
    with pytest.raises(ValueError, match=r"lengths\[1\]=9 exceeds capacity=8"):
        first_fit_decreasing([1, 9], 8)
    assert first_fit_decreasing([], 8) == []


# --------------------------------------------------------------------- binary decomposition


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 1 << 20),
    lo=st.integers(0, 10),
    span=st.integers(0, 8),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_binary_decomposition_properties(n, lo, span, seed):
    hi = lo + span
    n %= 1 << (hi + 7)  # up to 128 capped chunks: past the cap, and quick to draw
    rng = None if seed is None else np.random.default_rng(seed)
    chunks = binary_decomposition(n, min_log2=lo, max_log2=hi, rng=rng)
    dropped = n - sum(chunks)
    assert 0 <= dropped < 1 << lo
    for c in chunks:
        assert c & (c - 1) == 0 and (1 << lo) <= c <= (1 << hi)
    if rng is None and n < 1 << (hi + 1):  # below the cap: exactly the binary expansion
        assert chunks == sorted(chunks, reverse=True)
        assert len(set(chunks)) == len(chunks)


def test_binary_decomposition_bad_bounds():
    with pytest.raises(ValueError, match="min_log2"):
        binary_decomposition(100, min_log2=5, max_log2=4)


# ---------------------------------------------------------------------- every strategy


def _runs(seg):
    """(start, end) of each run of one non-zero id."""
    change = np.flatnonzero(np.diff(seg)) + 1
    bounds = np.concatenate([[0], change, [len(seg)]])
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if seg[a] != 0]


def _token_runs(dataset, steps=None):
    """Every run of tokens in order, a continued piece (position > 0 at a row start) joined."""
    runs = []
    for step, batch in enumerate(dataset):
        if steps is not None and step == steps:
            break
        for tokens, seg, pos in zip(
            batch["tokens"], batch["segment_ids"], batch["positions"], strict=True
        ):
            for start, end in _runs(seg):
                piece = tuple(int(x) for x in tokens[start:end])
                if pos[start] > 0 and runs:  # concat_chunk continues a piece across rows
                    runs[-1] = runs[-1] + piece
                else:
                    runs.append(piece)
    return runs


@pytest.mark.parametrize(
    "packing", ["first_fit", "best_fit", "concat_chunk", "ffd", "padded", "chunkflow"]
)
def test_every_token_exactly_once_per_epoch(packing, rng):
    # Tokens are their global index: each must appear once, in runs inside one document.
    lengths = rng.integers(1, 3 * SEQ_LEN, 40)
    corpus = _unique_corpus(lengths)
    opts = options(packing, seq_len=SEQ_LEN, batch_size=3, num_epochs=1, seed=5)
    runs = _token_runs(packed_dataset(corpus, opts))
    seen = np.sort(np.concatenate([np.asarray(r) for r in runs]))
    np.testing.assert_array_equal(seen, np.arange(corpus.num_tokens))
    for run in runs:
        run = np.asarray(run)
        np.testing.assert_array_equal(np.diff(run), 1)  # consecutive tokens of the corpus
        docs = np.searchsorted(corpus.offsets, run, side="right")
        assert docs.min() == docs.max(), "a run mixes documents"
    if packing == "chunkflow":  # a long document's chunks are consecutive: rejoined whole
        assert len(runs) == corpus.num_documents
    elif packing != "padded":  # long documents are split, short ones share rows
        assert len(runs) > corpus.num_documents


def test_dataset_decomposition_chunks_cover_the_corpus_once(rng):
    corpus = _unique_corpus(rng.integers(1, 3000, 60))
    opts = DecompositionOptions(
        1024, min_log2=4, max_log2=9, curriculum="grow_p2", cycles=1, seed=3
    )
    ds = DecomposedDataset(corpus, opts)
    starts = np.concatenate(ds.buckets)
    sizes = np.concatenate([np.full(len(b), 1 << (4 + k)) for k, b in enumerate(ds.buckets)])
    covered = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)])
    assert len(np.unique(covered)) == len(covered)  # no token twice
    assert len(covered) + ds.dropped_tokens() == corpus.num_tokens
    docs = np.searchsorted(corpus.offsets, covered, side="right")
    np.testing.assert_array_equal(
        docs, np.searchsorted(corpus.offsets, starts, "right").repeat(sizes)
    )
    # Iterating one pass of the smallest bucket's steps returns rows that are those chunks.
    it = iter(ds)
    for _ in range(20):
        batch = next(it)
        assert batch["tokens"].size == 1024  # tokens per step constant
        assert batch["tokens"].shape in ds.bucket_shapes()
        first = batch["tokens"][:, 0]
        assert np.isin(first, starts).all()  # each row is one whole chunk
        width = batch["tokens"].shape[1]
        np.testing.assert_array_equal(batch["tokens"], first[:, None] + np.arange(width))


def test_curriculum_frequencies_match_the_weights():
    # Three buckets (16, 32, 64 tokens) holding 3000 steps each; grow_p2 weights 32:16:8.
    lengths = np.concatenate([np.full(12000, 16), np.full(6000, 32), np.full(3000, 64)])
    corpus = _unique_corpus(np.random.default_rng(0).permutation(lengths))
    opts = DecompositionOptions(64, min_log2=4, max_log2=6, curriculum="grow_p2", cycles=1, seed=11)
    it = iter(DecomposedDataset(corpus, opts))
    expected, counts = np.zeros(3), np.zeros(3)
    n = 1500
    for _ in range(n):
        expected += it.bucket_probabilities()
        counts[int(np.log2(next(it)["tokens"].shape[1])) - 4] += 1
    expected /= n
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) < 4 * sigma), (counts / n, expected)
    assert expected[0] > expected[1] > expected[2]  # short buckets first (Grow-P2)


def test_uniform_curriculum_and_cycles():
    lengths = np.concatenate([np.full(64, 16), np.full(32, 32)])
    corpus = _unique_corpus(lengths)
    opts = DecompositionOptions(
        tokens_per_step=64, min_log2=4, max_log2=5, curriculum="uniform", cycles=2
    )
    it = iter(DecomposedDataset(corpus, opts))
    shapes = [next(it)["tokens"].shape for _ in range(48)]
    # 16 steps per bucket per epoch, 8 per cycle: each cycle (and epoch) takes 8 of each.
    for cycle in range(3):
        part = shapes[16 * cycle : 16 * (cycle + 1)]
        assert part.count((4, 16)) == part.count((2, 32)) == 8


@pytest.mark.parametrize(
    "packing", ["first_fit", "best_fit", "concat_chunk", "ffd", "padded", "dd"]
)
def test_iterator_state_resumes_exactly(packing):
    corpus = _unique_corpus(np.random.default_rng(2).integers(1, 300, 50))
    opts = options(packing, seq_len=SEQ_LEN, batch_size=2, seed=3)
    ds = packed_dataset(corpus, opts)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("packing", ["first_fit", "ffd", "dd", "chunkflow"])
def test_two_hosts_see_disjoint_data_and_the_same_buckets(packing):
    corpus = _unique_corpus(np.random.default_rng(1).integers(1, 500, 200))
    hosts = []
    for index in range(2):
        opts = options(
            packing, seq_len=SEQ_LEN, batch_size=2, seed=4, shard_index=index, shard_count=2
        )
        it = iter(packed_dataset(corpus, opts))
        hosts.append([next(it) for _ in range(12)])
    for a, b in zip(*hosts, strict=True):
        assert a["tokens"].shape == b["tokens"].shape  # same bucket on both hosts
        real_a = a["tokens"][a["segment_ids"] != 0]
        real_b = b["tokens"][b["segment_ids"] != 0]
        assert not np.intersect1d(real_a, real_b).size


def test_chunkflow_rows_carry_document_and_chunk_index():
    lengths = np.asarray([10, 200, 30, 64, 65])
    corpus = _unique_corpus(lengths)
    opts = options("chunkflow", seq_len=64, batch_size=1, num_epochs=1)
    rows = [b for b in packed_dataset(corpus, opts)]
    long_rows = [r for r in rows if r["chunk_document"][0, 0] >= 0]
    chunks = [(int(r["chunk_document"][0, 0]), int(r["chunk_index"][0, 0])) for r in long_rows]
    assert sorted(chunks) == [(1, 0), (1, 1), (1, 2), (1, 3), (4, 0), (4, 1)]
    for doc in (1, 4):  # consecutive, in order, positions continuing
        mine = [r for r in long_rows if r["chunk_document"][0, 0] == doc]
        assert [int(r["chunk_index"][0, 0]) for r in mine] == list(range(len(mine)))
        pos = np.concatenate([r["positions"][0][r["segment_ids"][0] != 0] for r in mine])
        np.testing.assert_array_equal(pos, np.arange(lengths[doc]))
    merged = [r for r in rows if r["chunk_document"][0, 0] < 0]
    assert sum(int((r["segment_ids"] != 0).sum()) for r in merged) == 10 + 30 + 64


def test_chunkflow_keeps_a_document_in_one_batch():
    corpus = _unique_corpus(np.random.default_rng(3).integers(1, 4 * 64, 60))
    opts = options("chunkflow", seq_len=64, batch_size=4, num_epochs=1, seed=1)
    batches = list(packed_dataset(corpus, opts))
    where = {}
    for b, batch in enumerate(batches):
        for doc in batch["chunk_document"][batch["chunk_document"] >= 0]:
            where.setdefault(int(doc), set()).add(b)
    assert where and all(len(batches_of_doc) == 1 for batches_of_doc in where.values())


def test_bad_options():
    with pytest.raises(ValueError, match=r"data.dd.min_log2"):
        options("dd", seq_len=64, batch_size=2, dd={"min_log2": 7, "max_log2": 6})
    with pytest.raises(ValueError, match="tokens per step"):
        options("dd", seq_len=64, batch_size=2, dd={"max_log2": 8})
    with pytest.raises(ValueError, match=r"data.dd is needed .*'min_log2'"):
        PipelineOptions(seq_len=64, batch_size=2, pad_id=0, packing="dd")
    with pytest.raises(ValueError, match=r"data.first_fit=.*needs exactly the keys \['num_bins'\]"):
        PipelineOptions(seq_len=64, batch_size=2, pad_id=0, settings={"bins": 3})
    with pytest.raises(ValueError, match=r"data.ffd: packing='ffd' takes no settings"):
        PipelineOptions(seq_len=64, batch_size=2, pad_id=0, packing="ffd", settings={"x": 1})
    for packing in ("first_fit", "ffd", "chunkflow", "dd"):
        opts = options(packing, seq_len=64, batch_size=2)
        with pytest.raises(ValueError, match="empty"):
            packed_dataset(_unique_corpus([]), opts)
