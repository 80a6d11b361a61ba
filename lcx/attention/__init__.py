"""Packed (segmented) attention: reference, dispatch, and (later) Pallas kernels."""

from lcx.attention.api import IMPLEMENTATIONS, packed_attention
from lcx.attention.reference import reference_attention, visibility_mask

__all__ = ["IMPLEMENTATIONS", "packed_attention", "reference_attention", "visibility_mask"]
