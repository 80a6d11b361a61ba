"""Small pieces shared by the model and the LaCT layers: parameters, RoPE, RMS scaling.

Rotary position embeddings: Su et al., RoFormer (arXiv 2104.09864).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(key, shape, stddev, names):
    """A normally initialised float32 parameter tagged with logical axis names.

    Sharding is applied by the caller's jit out_shardings (lcx.train.sharding), so
    eager sharding, which would need a mesh at construction time, is off.
    """
    value = nnx.initializers.normal(stddev)(key, shape, jnp.float32)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def constant_param(value, names):
    """A float32 parameter initialised to `value`, with logical axis names."""
    return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=names, eager_sharding=False)


def apply_rope(x_BxTxHxD, positions_BxT, theta):
    """Rotate channel pairs (first half, second half) by position-dependent angles."""
    d = x_BxTxHxD.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
    angle_BxTx1xF = (positions_BxT[..., None].astype(jnp.float32) * freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
    x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def rms_normalise(x, eps):
    """x / rms(x) over the last axis, in float32 (no learned scale)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
