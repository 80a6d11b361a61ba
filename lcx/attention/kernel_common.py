"""Pieces shared by the packed-attention implementations: block sizes, padding, loops."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcx.attention.layout import block_schedule
from lcx.attention.segments import Segments

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
    def q_multiple(self) -> int:
        """A query length padded to this is divisible by every pass's q block."""
        return int(np.lcm.reduce([self.block_q, self.dq[0], self.dkv[0]]))

    @property
    def kv_multiple(self) -> int:
        """A key length padded to this is divisible by every pass's kv block."""
        return int(np.lcm.reduce([self.block_kv, self.dq[1], self.dkv[1]]))


def pad_length(x, length: int, axis: int = 1, value=0):
    """Pad `x` along `axis` to `length` with `value`."""
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pad_or_none(x, length):
    """`x` padded along T to `length`; None stays None."""
    return None if x is None else pad_length(x, length)


def tile_schedule(seg: Segments, block_q: int, block_kv: int, *, causal, window):
    """`block_schedule` of padded segments for (block_q, block_kv) tiles: what each
    kernel (XLA chunked, Pallas TPU, Pallas GPU) visits."""
    return block_schedule(
        seg.q_ids,
        block_q=block_q,
        block_kv=block_kv,
        causal=causal,
        window=window,
        kv_segment_ids=seg.kv_ids,
        q_positions=seg.q_positions,
        kv_positions=seg.kv_positions,
    )


def pad_to_blocks(q, k, v, segments: Segments, q_multiple: int, kv_multiple: int):
    """q, k, v and segments padded along T to block multiples; padding has segment id 0.

    Self-attention (segments.kv_ids None) pads both sides to one length, a multiple of
    both, so queries and keys stay aligned.
    """
    tq, tk = q.shape[1], k.shape[1]
    if segments.kv_ids is None:
        q_multiple = kv_multiple = int(np.lcm(q_multiple, kv_multiple))
    lq, lk = -(-tq // q_multiple) * q_multiple, -(-tk // kv_multiple) * kv_multiple
    segments = Segments(
        _pad_or_none(segments.q_ids, lq),
        _pad_or_none(segments.kv_ids, lk),
        _pad_or_none(segments.q_positions, lq),
        _pad_or_none(segments.kv_positions, lk),
    )
    return pad_length(q, lq), pad_length(k, lk), pad_length(v, lk), segments


def products_precision(dtype):
    """Precision of the products of attention inputs of `dtype`: HIGHEST for float32, so
    float32 stays float32 (GPUs run a default float32 product in TF32, TPUs in bf16
    passes); the backend's default otherwise (16-bit inputs: the tensor cores)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def tile_mask(q_ids_Qx1, k_ids_1xS, q_pos_Qx1, k_pos_1xS, *, causal, window):
    """[Q, S] visibility of a (q block, kv block) tile: same document, causal, window."""
    mask = (q_ids_Qx1 == k_ids_1xS) & (q_ids_Qx1 != 0)
    if causal:
        mask &= k_pos_1xS <= q_pos_Qx1
    if window is not None:
        mask &= jnp.abs(q_pos_Qx1 - k_pos_1xS) < window
    return mask


def visit_blocks(lo, hi, full_lo, full_hi, body, carry):
    """Fold body(j, carry, masked=...) over blocks [lo, hi]; unmasked on [full_lo, full_hi]."""
    no_full = full_hi < full_lo
    f_lo = jnp.where(no_full, hi + 1, jnp.clip(full_lo, lo, hi + 1))
    f_hi = jnp.where(no_full, hi, jnp.clip(full_hi, f_lo - 1, hi))
    carry = jax.lax.fori_loop(lo, f_lo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(f_lo, f_hi + 1, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(f_hi + 1, hi + 1, functools.partial(body, masked=True), carry)


def saw_a_key(running_max):
    """Queries whose running max left MASK_VALUE: they saw at least one key."""
    return running_max > 0.5 * MASK_VALUE


def natural_lse(lse, seen, *, base2=False):
    """The public log-sum-exp: natural log, float32 (or wider), -inf where nothing seen."""
    lse = lse * np.log(2.0) if base2 else lse
    return jnp.where(seen, lse, -jnp.inf).astype(jnp.promote_types(lse.dtype, jnp.float32))


def finite_lse(lse):
    """The lse the backward kernels take: -inf (saw nothing) becomes 0, whose p is 0."""
    return jnp.where(jnp.isfinite(lse), lse, 0.0)
