"""The `custom_vjp` every flash-attention implementation shares: (out, lse) saved, delta.

FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", 2023, arXiv 2307.08691) recomputes the probabilities in the backward
pass from the saved log-sum-exp, with delta = rowsum(dO * O) standing in for
rowsum(dP * P). A cotangent of the returned lse adds p * dlse to ds (d lse / d s = p), so
it enters as delta - dlse. The implementations differ only in their kernels and layouts;
`flash_attention_vjp` wires any pair of forward and backward passes this way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lcx.attention.kernel_common import finite_lse


def flash_attention_vjp(
    forward: Callable,
    backward: Callable,
    *,
    rows_as_lse: Callable | None = None,
    lse_base2: bool = False,
):
    """`attention(q, k, v, segments, **static) -> (out, lse)`, differentiable in q, k, v.

    Args:
      forward: `forward(q, k, v, segments, **static) -> (out, lse, *extra)`; lse is the
        float32 (or wider) log-sum-exp of each query row, -inf where it saw no key.
      backward: `backward(q, k, v, segments, lse, delta, dout, **static) -> (dq, dk, dv,
        *extra)`; lse finite (-inf made 0), delta = rowsum(dO * O) - dlse, both in lse's
        layout and dtype.
      rows_as_lse: maps sums over out's last axis (out.shape[:-1]) to lse's layout; None
        where they already match.
      lse_base2: lse is log2 of the row sum (exp2 kernels), so its cotangent is divided
        by ln 2 before it enters delta.

    `static` (scale, mask, block sizes, interpret flags) are hashable keyword arguments,
    not differentiated; neither are the segments (ids and positions).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attention(q, k, v, segments, static):
        out, lse, *_ = forward(q, k, v, segments, **dict(static))
        return out, lse

    def attention_fwd(q, k, v, segments, static):
        out, lse, *_ = forward(q, k, v, segments, **dict(static))
        return (out, lse), (q, k, v, segments, out, lse)

    def attention_bwd(static, residuals, cotangents):
        q, k, v, segments, out, lse = residuals
        dout, dlse = cotangents
        acc = lse.dtype  # float32; float64 for xla_chunked on float64 inputs
        # A sum of products, not an einsum: XLA would make that a dot, in TF32 on a GPU.
        delta = jnp.sum(out.astype(acc) * dout.astype(acc), axis=-1)
        delta = delta if rows_as_lse is None else rows_as_lse(delta)
        dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0).astype(acc)
        delta = delta - (dlse / math.log(2.0) if lse_base2 else dlse)
        dq, dk, dv, *_ = backward(q, k, v, segments, finite_lse(lse), delta, dout, **dict(static))
        return dq, dk, dv, None

    attention.defvjp(attention_fwd, attention_bwd)

    def call(q, k, v, segments, **static):
        return attention(q, k, v, segments, tuple(sorted(static.items())))

    return call
