"""ChunkFlow chunks: short documents merged into chunks, long ones split into dependent chunks.

Yuan et al., "Efficient Long Context Fine-tuning with Chunk Flow" (arXiv 2503.02356).
With chunk size C (the row length): documents of at most C tokens are packed together
into rows by first-fit-decreasing (document-masked, segment ids per document); longer
documents are cut into consecutive chunks of C tokens (the last one shorter, padded),
kept in one batch when they fit (padding rows fill the gap; a document of more chunks
than the batch has rows continues in the next batch without its earlier chunks), each
row carrying `chunk_document` (the document's index in the corpus) and
`chunk_index`, with positions continuing across the chunks. Rows of merged short
documents carry `chunk_document = -1`. The chunks of one long document are consecutive
in the stream, so a trainer can run them in order with the earlier chunks' keys and
values visible (`lcx.train.chunkflow`).

The units (a merged row, or all the chunks of one long document) are shuffled once by
the seed (every epoch repeats that order) and sharded across hosts by unit.
"""

from __future__ import annotations

import grain
import numpy as np

from lcx.data.store import TokenizedCorpus
from lcx.errors import UserError
from lcx.packing.ffd import first_fit_decreasing
from lcx.packing.rows import packed_row


class ChunkFlowRows:
    """grain random-access source: row i of the ChunkFlow layout (units in `unit_order`)."""

    def __init__(
        self,
        corpus: TokenizedCorpus,
        chunk: int,
        pad_id: int,
        *,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        if chunk <= 1:
            raise UserError(f"chunk size (train.seq_len)={chunk} must be > 1")
        self._corpus, self._chunk, self._pad_id = corpus, chunk, pad_id
        lengths = corpus.lengths
        short = np.flatnonzero((lengths <= chunk) & (lengths > 0))
        long = np.flatnonzero(lengths > chunk)
        bins = first_fit_decreasing(lengths[short], chunk)
        units = [("merged", [int(short[i]) for i in b]) for b in bins]
        units += [("long", int(d)) for d in long]
        order = np.arange(len(units))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(units))
        units = [units[i] for i in order[shard_index::shard_count]]
        # ("merged", docs), ("long", doc, chunk index) or ("pad",). A unit that does not
        # fit in the batch's remaining rows starts the next batch (padding rows fill the
        # gap), so a document of at most batch_size chunks never straddles two batches.
        self.rows: list[tuple] = []
        for kind, what in units:
            n = 1 if kind == "merged" else -(-int(lengths[what]) // chunk)
            if len(self.rows) % batch_size + n > batch_size:  # start on a batch boundary
                self.rows.extend([("pad",)] * (-len(self.rows) % batch_size))
            if kind == "merged":
                self.rows.append((kind, what))
            else:
                self.rows.extend(("long", what, i) for i in range(n))
        self.rows.extend([("pad",)] * (-len(self.rows) % batch_size))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        c = self._chunk
        entry = self.rows[index]
        corpus = self._corpus
        docs = entry[1] if entry[0] == "merged" else []
        weights = None if corpus.weights is None else [corpus.document_weights(d) for d in docs]
        row = packed_row([corpus.document(d) for d in docs], c, self._pad_id, weights)
        row["chunk_document"] = np.full(1, -1, np.int32)  # [1] per row: batches are [B, 1]
        row["chunk_index"] = np.zeros(1, np.int32)
        if entry[0] == "long":
            _, doc, i = entry
            tokens = self._corpus.document(doc)[i * c : (i + 1) * c]
            n = len(tokens)
            row["tokens"][:n] = tokens
            row["segment_ids"][:n] = 1
            row["positions"][:n] = i * c + np.arange(n)
            if weights is not None:
                row["weights"][:n] = corpus.document_weights(doc)[i * c : (i + 1) * c]
            row["chunk_document"][0], row["chunk_index"][0] = doc, i
        return row


def chunkflow_dataset(
    corpus, *, chunk, batch_size, pad_id, seed, shuffle, num_epochs, shard_index=0, shard_count=1
) -> grain.IterDataset:
    """Batches of ChunkFlow rows, in order (a long document's chunks stay consecutive)."""
    source = ChunkFlowRows(
        corpus,
        chunk,
        pad_id,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    ds = grain.MapDataset.source(source).repeat(num_epochs).to_iter_dataset()
    return ds.batch(batch_size, drop_remainder=num_epochs is None)


def chunkflow_rows(corpus: TokenizedCorpus, opts) -> grain.IterDataset:
    """The "chunkflow" strategy from PipelineOptions: chunks of seq_len tokens."""
    return chunkflow_dataset(
        corpus,
        chunk=opts.seq_len,
        batch_size=opts.batch_size,
        pad_id=opts.pad_id,
        seed=opts.seed,
        shuffle=opts.shuffle,
        num_epochs=opts.num_epochs,
        shard_index=opts.shard_index,
        shard_count=opts.shard_count,
    )
