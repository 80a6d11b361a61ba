"""Exact combination of attention computed over disjoint key sets, by log-sum-exp.

Hydragen (Juravsky et al., "Hydragen: High-Throughput LLM Inference with Shared
Prefixes", 2024, arXiv 2402.05099): with lse_j the log-sum-exp of part j's logits,
`m = max_j lse_j`, `w_j = exp(lse_j - m)`, `O = sum_j w_j O_j / sum_j w_j` and
`lse = m + log(sum_j w_j)`. Ring attention steps, shared prefixes and chunked prefill
all merge this way. Parts whose lse is -inf (queries that saw no key there) weigh 0;
a query that saw nothing anywhere gets 0 and lse -inf, with finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_attention(parts):
    """Merge [(out [B, T, H, D], lse [B, T, H]), ...] over disjoint keys into (out, lse).

    Differentiable in every out and lse. The result has the first part's out dtype and
    float32 (or wider) lse.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_attention: parts is empty; pass at least one (out, lse) pair")
    shape = parts[0][0].shape
    for j, (out, lse) in enumerate(parts):
        if out.shape != shape or lse.shape != shape[:-1]:
            raise ValueError(
                f"merge_attention: part {j} has out {out.shape} and lse {lse.shape}; every "
                f"part needs out {shape} and lse {shape[:-1]}"
            )
    acc = jnp.promote_types(parts[0][1].dtype, jnp.float32)
    lses = jnp.stack([lse.astype(acc) for _, lse in parts])
    # The shift only keeps exp() in range; the result does not depend on it.
    m = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    weights = jnp.exp(lses - m)  # exactly 0 for parts with lse = -inf
    total = jnp.sum(weights, axis=0)
    seen = total > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
    out = sum(w[..., None] * o.astype(acc) for w, (o, _) in zip(weights, parts, strict=True))
    out = (out * inv[..., None]).astype(parts[0][0].dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out, lse
