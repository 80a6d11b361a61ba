"""Packing on grain: pieces, packed rows and batches (Dataset Decomposition comes later)."""

from lcx.packing.pipeline import (
    STRATEGIES,
    DocumentPieces,
    PipelineOptions,
    batch_stats,
    packed_dataset,
)

__all__ = ["STRATEGIES", "DocumentPieces", "PipelineOptions", "batch_stats", "packed_dataset"]
