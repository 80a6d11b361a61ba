"""Input pipelines on grain, one per packing strategy, built by `packed_dataset`.

Every document is split into consecutive pieces no longer than the row, never dropped,
so each token of the corpus is seen exactly once per epoch. Strategies:
- `first_fit`, `best_fit`: grain's online packers, which emit `*_segment_ids`
  (0 = padding) and `*_positions` restarting at 0 per piece (README, "Conventions");
- `concat_chunk`: grain's concat-then-split: pieces back to back, cut every row; a
  piece cut in two continues its positions in the next row;
- `ffd`: offline first-fit-decreasing over the whole epoch (`lcx.packing.ffd`);
- `padded`: one piece per row, the baseline that packing is measured against;
- `dd`: Dataset Decomposition (`lcx.packing.decomposition`): one bucket per step,
  batches [tokens_per_step / 2^k, 2^k], one document chunk per row;
- `chunkflow`: ChunkFlow (`lcx.packing.chunkflow`): short documents merged into rows,
  long ones cut into consecutive dependent chunks with `chunk_document`/`chunk_index`.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lcx.data.store import TokenizedCorpus
from lcx.data.tokenizer import ByteTokenizer
from lcx.packing.chunkflow import chunkflow_dataset
from lcx.packing.decomposition import DecomposedDataset, DecompositionOptions
from lcx.packing.ffd import first_fit_decreasing
from lcx.packing.rows import packed_row

PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}
STRATEGIES = (*PACKERS, "concat_chunk", "ffd", "padded", "dd", "chunkflow")


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
    pad_id: int = ByteTokenizer().pad_id  # a special id, never a real byte
    shard_index: int = 0
    shard_count: int = 1
    # Dataset Decomposition ("dd"): bucket lengths 2^min_log2 .. 2^max_log2, curriculum.
    dd_min_log2: int = 6
    dd_max_log2: int = 13
    dd_curriculum: str = "grow_p2"
    dd_cycles: int = 1

    def __post_init__(self):
        if self.packing not in STRATEGIES:
            raise ValueError(f"data.packing={self.packing!r}; valid: {STRATEGIES}")
        if self.seq_len <= 1 or self.batch_size <= 0:
            raise ValueError(
                f"seq_len={self.seq_len} must be > 1 and batch_size={self.batch_size} > 0"
            )
        if self.packing == "dd":
            decomposition_options(self)  # validates the dd_* fields


def _pad_one_piece(seq_len, pad_id):
    """Map a piece to a full row: the piece, then padding (segment id 0)."""

    def pad(example):
        return packed_row([example["tokens"]], seq_len, pad_id)

    return pad


def _rename_packed(example):
    """grain's packed feature names -> lcx's batch keys."""
    return {
        "tokens": example["tokens"],
        "segment_ids": example["tokens_segment_ids"],
        "positions": example["tokens_positions"],
    }


def _pad_concat(seq_len, pad_id):
    """grain's concat-then-split row (the last may be short) -> lcx's padded batch keys."""

    def pad(example):
        row = _rename_packed(example)
        n = len(row["tokens"])
        if n == seq_len:
            return row
        out = {k: np.zeros(seq_len, np.int32) for k in row}
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
        pieces = [self._pieces[p]["tokens"] for p in self.bins[index]]
        return packed_row(pieces, self._seq_len, self._pad_id)


def decomposition_options(opts: PipelineOptions) -> DecompositionOptions:
    """Dataset Decomposition's options: this host's tokens per step times the hosts."""
    return DecompositionOptions(
        tokens_per_step=opts.batch_size * opts.seq_len * opts.shard_count,
        min_log2=opts.dd_min_log2,
        max_log2=opts.dd_max_log2,
        curriculum=opts.dd_curriculum,
        cycles=opts.dd_cycles,
        seed=opts.seed,
        shard_index=opts.shard_index,
        shard_count=opts.shard_count,
    )


def packed_dataset(corpus: TokenizedCorpus, opts: PipelineOptions) -> grain.IterDataset:
    """A grain IterDataset of batches {tokens, segment_ids, positions}, each int32 [B, T].

    For "dd", B and T change between steps (one bucket's shape per step; B * T fixed),
    and the dataset repeats forever whatever `num_epochs`.
    """
    if corpus.num_tokens == 0:
        raise ValueError(
            f"data.paths: the corpus is empty; data.packing={opts.packing!r} needs tokens"
        )
    if opts.packing == "dd":
        return DecomposedDataset(corpus, decomposition_options(opts))
    if opts.packing == "chunkflow":
        return chunkflow_dataset(
            corpus, chunk=opts.seq_len, batch_size=opts.batch_size, pad_id=opts.pad_id,
            seed=opts.seed, shuffle=opts.shuffle, num_epochs=opts.num_epochs,
            shard_index=opts.shard_index, shard_count=opts.shard_count,
        )  # fmt: skip
    if opts.packing == "ffd":
        ds = grain.MapDataset.source(
            FFDRows(DocumentPieces(corpus, opts.seq_len), opts.seq_len, opts.pad_id)
        )
        if opts.shard_count > 1:
            ds = ds[opts.shard_index :: opts.shard_count]
        if opts.shuffle:
            ds = ds.shuffle(seed=opts.seed)
        ds = ds.repeat(opts.num_epochs).to_iter_dataset()
        return ds.batch(opts.batch_size, drop_remainder=opts.num_epochs is None)
    ds = grain.MapDataset.source(DocumentPieces(corpus, opts.seq_len))
    if opts.shard_count > 1:
        ds = ds[opts.shard_index :: opts.shard_count]
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    ds = ds.repeat(opts.num_epochs)
    rows = ds.to_iter_dataset()
    if opts.packing == "padded":
        rows = rows.map(_pad_one_piece(opts.seq_len, opts.pad_id))
    elif opts.packing == "concat_chunk":
        rows = grain.experimental.ConcatThenSplitIterDataset(
            rows, length_struct={"tokens": opts.seq_len}
        ).map(_pad_concat(opts.seq_len, opts.pad_id))
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
