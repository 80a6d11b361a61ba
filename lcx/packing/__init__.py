"""Packing on grain: strategies (first/best fit, concat-then-split, offline FFD, padded),
Dataset Decomposition buckets and curriculum, batch statistics."""

from lcx.packing.decomposition import (
    CURRICULA,
    DecomposedDataset,
    DecompositionOptions,
    binary_decomposition,
)
from lcx.packing.ffd import first_fit_decreasing
from lcx.packing.pipeline import (
    STRATEGIES,
    DocumentPieces,
    PipelineOptions,
    batch_stats,
    packed_dataset,
)

__all__ = [
    "CURRICULA",
    "STRATEGIES",
    "DecomposedDataset",
    "DecompositionOptions",
    "DocumentPieces",
    "PipelineOptions",
    "batch_stats",
    "binary_decomposition",
    "first_fit_decreasing",
    "packed_dataset",
]
