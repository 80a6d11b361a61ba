"""Mesh construction and logical-axis sharding rules, resolved in this one place.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...); the config maps them
to mesh axes (`data`, `fsdp`, `tensor`, `sequence`). Batches are sharded over the
`batch` logical axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcx.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
# Logical axis -> mesh axes: batch over data and fsdp, parameters FSDP-sharded on their
# model dimension and tensor-parallel on heads and the MLP width (configs use these).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes; one of them may be -1 for the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """Concrete sizes whose product is `num_devices`."""
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise UserError(f"config.mesh={self}: sizes must be positive, at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise UserError(f"config.mesh={self} does not divide {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise UserError(
                f"config.mesh={self} needs {math.prod(sizes)} devices; {num_devices} available"
            )
        return tuple(sizes)


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape.resolve(len(devices))
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_sharding(
    logical_specs, mesh: Mesh, rules: Sequence[tuple[str, object]], shapes=None
):
    """Map a tree of logical PartitionSpecs to NamedShardings on `mesh`.

    With `shapes` (a matching tree of arrays or ShapeDtypeStructs), a dimension the mesh
    axes do not divide stays whole (e.g. one kv head under tensor=2): replicated there.
    """
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])
    if shapes is None:
        return shardings
    return jax.tree.map(lambda sh, x: _fit(sh, x.shape), shardings, shapes)


def _fit(sharding: NamedSharding, shape) -> NamedSharding:
    """`sharding` without the mesh axes that do not divide their dimension."""
    spec = []
    for i, axes in enumerate(sharding.spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(sharding.mesh.shape[a] for a in names)
        spec.append(axes if size and i < len(shape) and shape[i] % size == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of [B, T] batch arrays: B over the mesh axes the `batch` rule names."""
    return logical_to_sharding(PartitionSpec("batch", "length"), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh, rules) -> int:
    """How many shards the batch dimension is split into."""
    spec = batch_sharding(mesh, rules).spec[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding):
    """Assemble global arrays from each process's rows of the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
