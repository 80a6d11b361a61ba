"""Pieces shared by the Pallas packed-attention kernels: block sizes, padding, checks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# A large finite negative logit: masked entries vanish in exp() without inf - inf NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward pass and of the two backward passes (dq, dkv)."""

    block_q: int = 128
    block_kv: int = 128
    block_q_dq: int | None = None  # default: block_q
    block_kv_dq: int | None = None  # default: block_kv
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (value <= 0 or value % 8):
                raise ValueError(
                    f"block_sizes.{field.name}={value} must be a positive multiple of 8"
                )

    @property
    def dq(self) -> tuple[int, int]:
        return self.block_q_dq or self.block_q, self.block_kv_dq or self.block_kv

    @property
    def dkv(self) -> tuple[int, int]:
        return self.block_q_dkv or self.block_q, self.block_kv_dkv or self.block_kv

    @property
    def multiple(self) -> int:
        """Every length padded to this is divisible by all the blocks."""
        sizes = [self.block_q, self.block_kv, *self.dq, *self.dkv]
        return int(np.lcm.reduce(sizes))


def pad_length(x, length: int, axis: int = 1, value=0):
    """Pad `x` along `axis` to `length` with `value`."""
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def padded_inputs(q, k, v, segment_ids, multiple: int):
    """Inputs padded along T to a multiple of the blocks; padding has segment id 0."""
    b, t = q.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    length = -(-t // multiple) * multiple
    segment_ids = pad_length(jnp.asarray(segment_ids, jnp.int32), length)
    return pad_length(q, length), pad_length(k, length), pad_length(v, length), segment_ids


def check_runs_contiguous(segment_ids) -> None:
    """ValueError if a segment id reappears after another run (host check, not free)."""
    seg = np.asarray(jax.device_get(segment_ids))
    for row, ids in enumerate(seg):
        starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 1))
        run_ids = ids[starts]
        run_ids = run_ids[run_ids != 0]
        if len(np.unique(run_ids)) != len(run_ids):
            raise ValueError(
                f"segment_ids row {row}: a document's id reappears after another run; "
                f"each document must be one contiguous run (shape {seg.shape})"
            )
