"""Small pieces shared by the model and the LaCT layers: parameters, RoPE, RMS scaling.

Rotary position embeddings: Su et al., RoFormer (arXiv 2104.09864); the `llama3` and
`linear` frequency scalings of Llama 3.1 (arXiv 2407.21783) and Chen et al. (position
interpolation, arXiv 2306.15595), as Hugging Face configs name them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROPE_SCALINGS = ("linear", "llama3")


def param(key, shape, stddev, names, dtype=jnp.float32):
    """A normally initialised parameter (float32 unless `dtype`) with logical axis names.

    Sharding is applied by the caller's jit out_shardings (lcx.runtime.sharding), so
    eager sharding, which would need a mesh at construction time, is off.
    """
    value = nnx.initializers.normal(stddev)(key, shape, jnp.float32).astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def constant_param(value, names, dtype=jnp.float32):
    """A parameter initialised to `value` (float32 unless `dtype`), with logical axis names."""
    return nnx.Param(jnp.asarray(value, dtype), out_sharding=names, eager_sharding=False)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """The head_dim // 2 rotation frequencies (float32), with an optional scaling.

    `scaling`: None or a mapping with `rope_type` "linear" (`factor`) or "llama3"
    (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`):
    Llama 3.1's rule keeps high frequencies, divides low ones by `factor` and blends
    between (Hugging Face's `_compute_llama3_parameters`).
    """
    freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return freq.astype(np.float32)
    scaling = dict(scaling)
    kind, factor = scaling.get("rope_type"), float(scaling["factor"])
    if kind == "linear":
        return (freq / factor).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: {ROPE_SCALINGS}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / freq
    scaled = np.where(wavelength > context / low, freq / factor, freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BxTxHxD, positions_BxT, theta, scaling=None):
    """Rotate channel pairs (first half, second half) by position-dependent angles."""
    freq = jnp.asarray(rope_frequencies(x_BxTxHxD.shape[-1], theta, scaling))
    angle_BxTx1xF = (positions_BxT[..., None].astype(jnp.float32) * freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
    x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def rms_normalise(x, eps):
    """x / rms(x) over the last axis, in float32 (no learned scale)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
