"""Input pipeline on grain: documents -> pieces of at most one row -> packed rows -> batches.

Every document is split into consecutive pieces no longer than the row, never dropped,
so each token of the corpus is seen exactly once per epoch. Rows are packed with grain's
first-fit or best-fit packers, which emit `*_segment_ids` (0 = padding) and
`*_positions` restarting at 0 per piece, the layout DESIGN.md fixes. The "padded"
strategy puts one piece per row: the baseline that packing is measured against.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lcx.data.store import TokenizedCorpus

PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}
STRATEGIES = (*PACKERS, "padded")


class DocumentPieces:
    """grain random-access source: document i split into pieces of <= max_len tokens."""

    def __init__(self, corpus: TokenizedCorpus, max_len: int):
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be positive")
        self._tokens = corpus.tokens
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
        return {"tokens": self._tokens[self.starts[index] : self.ends[index]].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How rows are built from a tokenized corpus."""

    seq_len: int
    batch_size: int
    packing: str = "first_fit"
    num_packing_bins: int = 0  # 0: one bin per row of the batch
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    pad_id: int = 0
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self):
        if self.packing not in STRATEGIES:
            raise ValueError(f"data.packing={self.packing!r}; valid: {STRATEGIES}")
        if self.seq_len <= 1 or self.batch_size <= 0:
            raise ValueError(
                f"seq_len={self.seq_len} must be > 1 and batch_size={self.batch_size} > 0"
            )


def _pad_one_piece(seq_len, pad_id):
    """Map a piece to a full row: the piece, then padding (segment id 0)."""

    def pad(example):
        tokens = example["tokens"]
        n = len(tokens)
        row = np.full(seq_len, pad_id, np.int32)
        row[:n] = tokens
        segment_ids = np.zeros(seq_len, np.int32)
        segment_ids[:n] = 1
        positions = np.zeros(seq_len, np.int32)
        positions[:n] = np.arange(n)
        return {"tokens": row, "segment_ids": segment_ids, "positions": positions}

    return pad


def _rename_packed(example):
    """grain's packed feature names -> lcx's batch keys."""
    return {
        "tokens": example["tokens"],
        "segment_ids": example["tokens_segment_ids"],
        "positions": example["tokens_positions"],
    }


def packed_dataset(corpus: TokenizedCorpus, opts: PipelineOptions) -> grain.IterDataset:
    """A grain IterDataset of batches {tokens, segment_ids, positions}, each int32 [B, T]."""
    ds = grain.MapDataset.source(DocumentPieces(corpus, opts.seq_len))
    if opts.shard_count > 1:
        ds = ds[opts.shard_index :: opts.shard_count]
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    ds = ds.repeat(opts.num_epochs)
    rows = ds.to_iter_dataset()
    if opts.packing == "padded":
        rows = rows.map(_pad_one_piece(opts.seq_len, opts.pad_id))
    else:
        rows = PACKERS[opts.packing](
            rows,
            length_struct={"tokens": opts.seq_len},
            num_packing_bins=opts.num_packing_bins or opts.batch_size,
            seed=opts.seed,
            shuffle_bins=opts.shuffle,
            padding_struct={"tokens": opts.pad_id},
        ).map(_rename_packed)
    return rows.batch(opts.batch_size, drop_remainder=opts.num_epochs is None)


def batch_stats(batch) -> dict[str, float]:
    """Real tokens, loss targets and padding fraction of one host batch."""
    seg = np.asarray(batch["segment_ids"])
    real = int((seg != 0).sum())
    targets = int(((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)).sum())
    return {"real_tokens": real, "target_tokens": targets, "padding_fraction": 1 - real / seg.size}
