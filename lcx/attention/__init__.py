"""Packed (segmented) attention: the jnp reference, the Pallas kernels, block schedules."""

from lcx.attention.api import IMPLEMENTATIONS, packed_attention
from lcx.attention.kernel_common import BlockSizes
from lcx.attention.layout import BlockSchedule, block_schedule, count_visited
from lcx.attention.reference import reference_attention, visibility_mask

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSchedule",
    "BlockSizes",
    "block_schedule",
    "count_visited",
    "packed_attention",
    "reference_attention",
    "visibility_mask",
]
