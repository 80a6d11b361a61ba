"""Row builders on grain for the packing strategies of `lcx.packing.strategies`.

Every document is split into consecutive pieces no longer than the row, never dropped,
so each token of the corpus is seen exactly once per epoch. Strategies:
- `first_fit`, `best_fit`: grain's online packers, which emit `*_segment_ids`
  (0 = padding) and `*_positions` restarting at 0 per piece (docs/conventions.md);
- `concat_chunk`: grain's concat-then-split: pieces back to back, cut every row; a
  piece cut in two continues its positions in the next row;
- `ffd`: offline first-fit-decreasing over the whole epoch (`lcx.packing.ffd`);
- `padded`: one piece per row, the baseline that packing is measured against.

Each builder takes (corpus, PipelineOptions) and returns a grain IterDataset of batches;
Dataset Decomposition and ChunkFlow build theirs in their own modules. A weighted corpus
(`TokenizedCorpus.weights`: conversations) adds `weights` (float32 [B, T], 0 on padding)
beside `segment_ids` in every strategy's batches: grain's packers and concat-then-split
carry it as one more feature.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lcx.data.store import TokenizedCorpus
from lcx.errors import UserError
from lcx.packing.ffd import first_fit_decreasing
from lcx.packing.rows import packed_row


class DocumentPieces:
    """grain random-access source: document i split into pieces of <= max_len tokens."""

    def __init__(self, corpus: TokenizedCorpus, max_len: int):
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be positive")
        self._tokens, self._weights = corpus.tokens, corpus.weights
        lengths = corpus.lengths
        pieces_per_doc = -(-lengths // max_len)
        doc_of_piece = np.repeat(np.arange(len(lengths)), pieces_per_doc)
        first_piece = np.cumsum(pieces_per_doc) - pieces_per_doc
        index_in_doc = np.arange(len(doc_of_piece)) - first_piece[doc_of_piece]
        self.starts = corpus.offsets[doc_of_piece] + index_in_doc * max_len
        self.ends = np.minimum(self.starts + max_len, corpus.offsets[doc_of_piece + 1])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        span = slice(self.starts[index], self.ends[index])
        piece = {"tokens": self._tokens[span].astype(np.int32)}
        if self._weights is not None:
            piece["weights"] = self._weights[span].astype(np.float32)
        return piece


def _pad_one_piece(seq_len, pad_id):
    """Map a piece to a full row: the piece, then padding (segment id 0)."""

    def pad(example):
        weights = [example["weights"]] if "weights" in example else None
        return packed_row([example["tokens"]], seq_len, pad_id, weights)

    return pad


def _rename_packed(example):
    """grain's packed feature names -> lcx's batch keys (weights: the packed feature
    itself; grain's segment ids and positions of it repeat the tokens')."""
    row = {
        "tokens": example["tokens"],
        "segment_ids": example["tokens_segment_ids"],
        "positions": example["tokens_positions"],
    }
    if "weights" in example:
        row["weights"] = example["weights"]
    return row


def _lengths_and_padding(opts, weighted: bool):
    """grain's length_struct and padding_struct for the features of a piece."""
    lengths, padding = {"tokens": opts.seq_len}, {"tokens": opts.pad_id}
    if weighted:
        lengths["weights"], padding["weights"] = opts.seq_len, 0.0
    return lengths, padding


def _pad_concat(seq_len, pad_id):
    """grain's concat-then-split row (the last may be short) -> lcx's padded batch keys."""

    def pad(example):
        row = _rename_packed(example)
        n = len(row["tokens"])
        if n == seq_len:
            return row
        out = {k: np.zeros(seq_len, v.dtype) for k, v in row.items()}
        out["tokens"][:] = pad_id
        for k, v in row.items():
            out[k][:n] = v
        return out

    return pad


class FFDRows:
    """grain random-access source: row i = the pieces of first-fit-decreasing bin i."""

    def __init__(self, pieces: DocumentPieces, seq_len: int, pad_id: int):
        self._pieces, self._seq_len, self._pad_id = pieces, seq_len, pad_id
        lengths = pieces.ends - pieces.starts
        self.bins = first_fit_decreasing(lengths, seq_len)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        pieces = [self._pieces[p] for p in self.bins[index]]
        weights = [p["weights"] for p in pieces] if pieces and "weights" in pieces[0] else None
        return packed_row([p["tokens"] for p in pieces], self._seq_len, self._pad_id, weights)


def _document_pieces(corpus: TokenizedCorpus, opts) -> grain.IterDataset:
    """This shard's document pieces of <= seq_len tokens, shuffled and repeated."""
    ds = grain.MapDataset.source(DocumentPieces(corpus, opts.seq_len))
    if opts.shard_count > 1:
        ds = ds[opts.shard_index :: opts.shard_count]
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    return ds.repeat(opts.num_epochs).to_iter_dataset()


def _batched(rows: grain.IterDataset, opts) -> grain.IterDataset:
    """Rows into batches; a finite epoch keeps its last, smaller batch."""
    return rows.batch(opts.batch_size, drop_remainder=opts.num_epochs is None)


@dataclasses.dataclass(frozen=True)
class PackerSettings:
    """`config.data.first_fit` / `config.data.best_fit`: grain's online packers."""

    num_bins: int  # rows packed at once; 0: one per row of the batch (packs poorly)

    def __post_init__(self):
        if self.num_bins < 0:
            raise UserError(f"num_bins={self.num_bins} must be >= 0 (0: one per batch row)")


def grain_packer(packer):
    """A strategy's `build` around one of grain's online packers."""

    def build(corpus: TokenizedCorpus, opts) -> grain.IterDataset:
        lengths, padding = _lengths_and_padding(opts, corpus.weights is not None)
        rows = packer(
            _document_pieces(corpus, opts),
            length_struct=lengths,
            num_packing_bins=opts.settings.num_bins or opts.batch_size,
            seed=opts.seed,
            shuffle_bins=opts.shuffle,
            padding_struct=padding,
        ).map(_rename_packed)
        return _batched(rows, opts)

    return build


def concat_chunk_rows(corpus: TokenizedCorpus, opts) -> grain.IterDataset:
    """grain's concat-then-split: pieces back to back, cut every seq_len tokens."""
    lengths, _ = _lengths_and_padding(opts, corpus.weights is not None)
    rows = grain.experimental.ConcatThenSplitIterDataset(
        _document_pieces(corpus, opts), length_struct=lengths
    ).map(_pad_concat(opts.seq_len, opts.pad_id))
    return _batched(rows, opts)


def padded_rows(corpus: TokenizedCorpus, opts) -> grain.IterDataset:
    """One document piece per row, then padding: the baseline packing is measured against."""
    rows = _document_pieces(corpus, opts).map(_pad_one_piece(opts.seq_len, opts.pad_id))
    return _batched(rows, opts)


def ffd_rows(corpus: TokenizedCorpus, opts) -> grain.IterDataset:
    """Offline first-fit-decreasing bins over the whole epoch, one bin per row."""
    ds = grain.MapDataset.source(
        FFDRows(DocumentPieces(corpus, opts.seq_len), opts.seq_len, opts.pad_id)
    )
    if opts.shard_count > 1:
        ds = ds[opts.shard_index :: opts.shard_count]
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    return _batched(ds.repeat(opts.num_epochs).to_iter_dataset(), opts)


def batch_stats(batch) -> dict[str, float]:
    """Real tokens, loss targets and padding fraction of one host batch."""
    seg = np.asarray(batch["segment_ids"])
    real = int((seg != 0).sum())
    targets = int(((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)).sum())
    return {"real_tokens": real, "target_tokens": targets, "padding_fraction": 1 - real / seg.size}
