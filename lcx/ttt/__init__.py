"""Test-time-training layers: LaCT (large-chunk test-time training) for packed rows."""

from lcx.ttt.fast_weights import (
    FastWeights,
    apply_fast_weights,
    descent_directions,
    lact_chunk_scan,
    newton_schulz,
)
from lcx.ttt.lact import LaCTConfig, LaCTLayer, LaCTSettings

__all__ = [
    "FastWeights",
    "LaCTConfig",
    "LaCTSettings",
    "LaCTLayer",
    "apply_fast_weights",
    "descent_directions",
    "lact_chunk_scan",
    "newton_schulz",
]
