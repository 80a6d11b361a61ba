"""Moved to `lcx.runtime.sharding` (below training, so model I/O and serving share it);
these names stay importable from here."""

from lcx.runtime.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshShape,
    batch_divisor,
    batch_sharding,
    logical_to_sharding,
    make_mesh,
    put_batch,
    replicated,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshShape",
    "batch_divisor",
    "batch_sharding",
    "logical_to_sharding",
    "make_mesh",
    "put_batch",
    "replicated",
]
