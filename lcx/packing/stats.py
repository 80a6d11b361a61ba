"""Packing statistics: padding, dropped and split documents, attention work, throughput.

Attention work per token relative to dense rows: sum over rows of sum_i L_i^2, over
(real tokens x T), with L_i the document runs and T the target row length. For full rows
of length T it is the mean of sum_i L_i^2 / T^2 per row: 1 for a row holding one
document, about 1 / n for n equal documents; a Dataset Decomposition row of 2^k tokens
counts 2^k / T. It is the fraction of a dense causal kernel's work per token that a
document-skipping kernel needs.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from lcx.data.store import TokenizedCorpus
from lcx.packing.decomposition import DecomposedDataset
from lcx.packing.strategies import PipelineOptions, packed_dataset


def run_lengths(segment_ids_row) -> np.ndarray:
    """Lengths of the runs of one non-zero segment id in a row."""
    seg = np.asarray(segment_ids_row)
    change = np.flatnonzero(np.diff(seg)) + 1
    bounds = np.concatenate([[0], change, [len(seg)]])
    starts, ends = bounds[:-1], bounds[1:]
    return (ends - starts)[seg[starts] != 0]


def attention_work(segment_ids) -> np.ndarray:
    """Per row, sum_i L_i^2 / T^2."""
    seg = np.asarray(segment_ids)
    t = seg.shape[1]
    return np.asarray([np.sum(run_lengths(r).astype(np.float64) ** 2) / t**2 for r in seg])


@dataclasses.dataclass
class PackingStats:
    """One strategy at one row length over (a prefix of) an epoch."""

    packing: str
    row_len: int
    rows: int = 0
    tokens: int = 0  # real tokens emitted
    slots: int = 0  # tokens + padding
    work: float = 0.0  # sum over rows of sum_i L_i^2 / T
    continuations: int = 0  # runs continuing a piece cut at a row start (concat_chunk)
    seconds: float = 0.0
    row_fill: list = dataclasses.field(default_factory=list)
    documents_split: int = 0
    tokens_dropped: int = 0

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / max(self.slots, 1)

    @property
    def attention_work_per_token(self) -> float:
        """Work of a document-skipping kernel relative to dense rows, per real token."""
        return self.work / max(self.tokens, 1)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def measure(corpus: TokenizedCorpus, opts: PipelineOptions, *, max_tokens: int = 0) -> PackingStats:
    """Iterate one epoch (or `max_tokens` real tokens) of a strategy, timing the pipeline."""
    stats = PackingStats(opts.packing, opts.seq_len)
    lengths = corpus.lengths
    ds = packed_dataset(corpus, dataclasses.replace(opts, num_epochs=1))
    if isinstance(ds, DecomposedDataset):  # chunks of documents; the remainders dropped
        stats.tokens_dropped = ds.dropped_tokens()
        chunks_per_doc = np.zeros(corpus.num_documents, np.int64)
        starts = np.concatenate(ds.buckets)
        np.add.at(chunks_per_doc, np.searchsorted(corpus.offsets, starts, "right") - 1, 1)
        stats.documents_split = int(np.sum(chunks_per_doc > 1))
    else:
        stats.documents_split = int(np.sum(lengths > opts.seq_len))
    epoch_tokens = corpus.num_tokens - stats.tokens_dropped
    iterator = iter(ds)
    budget = min(epoch_tokens, max_tokens) if max_tokens else epoch_tokens
    t0 = time.perf_counter()
    while stats.tokens < budget:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        seg = np.asarray(batch["segment_ids"])
        real = (seg != 0).sum(axis=1)
        stats.rows += len(seg)
        stats.tokens += int(real.sum())
        stats.slots += seg.size
        stats.work += float(np.sum(attention_work(seg)) * seg.shape[1] ** 2 / opts.seq_len)
        stats.row_fill.extend((real / seg.shape[1]).tolist())
        if opts.packing == "concat_chunk":
            stats.continuations += int(np.sum(np.asarray(batch["positions"])[:, 0] > 0))
    stats.seconds = time.perf_counter() - t0
    if opts.packing == "concat_chunk":  # cuts at row ends: an upper bound on documents
        stats.documents_split += stats.continuations
    return stats


def markdown_table(all_stats: list[PackingStats]) -> str:
    """One line per (strategy, row length)."""
    lines = [
        "| strategy | row | rows | padding | tokens dropped | documents split | "
        "attention work / dense | packing tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in all_stats:
        lines.append(
            f"| {s.packing} | {s.row_len} | {s.rows} | {s.padding_fraction:.3f} | "
            f"{s.tokens_dropped} | {s.documents_split} | {s.attention_work_per_token:.3f} | "
            f"{s.tokens_per_sec:,.0f} |"
        )
    return "\n".join(lines)
