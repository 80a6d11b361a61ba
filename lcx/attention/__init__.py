"""Packed (segmented) attention: one contract for every caller, its implementations, merging.

`packed_attention` (queries with segment ids and positions against keys with theirs,
optional log-sum-exp), `merge_attention` (exact combination of parts over disjoint keys),
`shared_prefix_attention` (prefixes stored once, merged in: Hydragen),
the jnp reference, the chunked XLA implementation, the Pallas kernels, block schedules
and converters to the cumulative-length (varlen) form.
"""

from lcx.attention.api import IMPLEMENTATIONS, packed_attention
from lcx.attention.kernel_common import BlockSizes
from lcx.attention.layout import BlockSchedule, block_schedule, count_visited
from lcx.attention.merge import merge_attention
from lcx.attention.reference import reference_attention, visibility_mask
from lcx.attention.ring import ring_attention, sequence_layout
from lcx.attention.segments import Segments
from lcx.attention.shared_prefix import SharedPrefix, prefix_attention, shared_prefix_attention
from lcx.attention.varlen import cu_seqlens_to_segment_ids, segment_ids_to_cu_seqlens

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSchedule",
    "BlockSizes",
    "Segments",
    "SharedPrefix",
    "block_schedule",
    "count_visited",
    "cu_seqlens_to_segment_ids",
    "merge_attention",
    "packed_attention",
    "prefix_attention",
    "reference_attention",
    "ring_attention",
    "segment_ids_to_cu_seqlens",
    "sequence_layout",
    "shared_prefix_attention",
    "visibility_mask",
]
