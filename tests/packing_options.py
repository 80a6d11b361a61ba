"""PipelineOptions for tests: the byte tokenizer's pad id and small per-strategy settings."""

from lcx.data import ByteTokenizer
from lcx.packing import REGISTRY, PipelineOptions

TEST_SETTINGS = {
    "first_fit": {"num_bins": 0},
    "best_fit": {"num_bins": 0},
    "dd": {"min_log2": 3, "max_log2": 6, "curriculum": "grow_p2", "cycles": 1},
}


def options(packing="first_fit", **kwargs) -> PipelineOptions:
    """PipelineOptions(packing=...) with TEST_SETTINGS (`dd=` updates the dd settings)."""
    settings = TEST_SETTINGS.get(packing) if REGISTRY[packing].settings else None
    dd = kwargs.pop("dd", {})
    if packing == "dd":
        settings = {**settings, **dd}
    kwargs.setdefault("pad_id", ByteTokenizer().pad_id)
    return PipelineOptions(packing=packing, settings=settings, **kwargs)
