"""Packing on grain: the strategies (`REGISTRY`, their names in `STRATEGIES`: first/best
fit, concat-then-split, offline FFD, padded, Dataset Decomposition, ChunkFlow), batch
statistics."""

from lcx.packing.decomposition import (
    CURRICULA,
    DecomposedDataset,
    DecompositionOptions,
    DecompositionSettings,
    binary_decomposition,
)
from lcx.packing.ffd import first_fit_decreasing
from lcx.packing.pipeline import DocumentPieces, PackerSettings, batch_stats
from lcx.packing.strategies import (
    REGISTRY,
    STRATEGIES,
    PipelineOptions,
    Strategy,
    mixed_dataset,
    packed_dataset,
    strategy,
    strategy_settings,
)

__all__ = [
    "CURRICULA",
    "REGISTRY",
    "STRATEGIES",
    "DecomposedDataset",
    "DecompositionOptions",
    "DecompositionSettings",
    "DocumentPieces",
    "PackerSettings",
    "PipelineOptions",
    "Strategy",
    "batch_stats",
    "binary_decomposition",
    "first_fit_decreasing",
    "mixed_dataset",
    "packed_dataset",
    "strategy",
    "strategy_settings",
]
