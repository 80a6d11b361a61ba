"""Pure-jnp packed (segmented) attention: the reference every kernel is tested against.

Semantics (DESIGN.md): query t attends key s iff both lie in the same segment run,
neither is padding (segment id 0), s <= t when causal, and t - s < window when a
window is set. Padding queries return exactly 0, with finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visibility_mask(segment_ids_BxT, *, causal=True, window=None):
    """Boolean [B, T, T] mask of which key each query may see."""
    seg = segment_ids_BxT
    t = seg.shape[1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    allowed = jnp.ones((t, t), dtype=bool)
    if causal:
        allowed &= k_idx <= q_idx
    if window is not None:
        allowed &= jnp.abs(q_idx - k_idx) < window
    return same & allowed[None]


def check_attention_args(q, k, v, segment_ids, window):
    """Raise ValueError for shapes or arguments packed attention cannot serve."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape=} {k.shape=} {v.shape=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape=} {v.shape=}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"q and k disagree on batch, length or head dim: {q.shape=} {k.shape=}")
    if hq % k.shape[2]:
        raise ValueError(f"query heads must be a multiple of kv heads: {q.shape=} {k.shape=}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}; got {segment_ids.shape=}")
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive number of tokens or None; got {window=}")


def reference_attention(q, k, v, segment_ids=None, *, causal=True, window=None, scale=None):
    """Packed attention in plain jnp; O(T^2) memory, for tests and small rows.

    Args:
      q: [B, T, Hq, D] queries.
      k, v: [B, T, Hkv, D] keys and values, Hq % Hkv == 0.
      segment_ids: int [B, T]; 0 is padding. None means one document per row.
      causal: mask keys after the query.
      window: if set, a query sees only keys with t - s < window.
      scale: logit scale, default 1/sqrt(D).

    Returns:
      [B, T, Hq, D] in q's dtype; exactly 0 for padding queries.
    """
    check_attention_args(q, k, v, segment_ids, window)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    scale = d**-0.5 if scale is None else scale
    q_BxTxKxGxD = q.reshape(b, t, hkv, hq // hkv, d)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 for bf16, float64 under x64
    logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k, preferred_element_type=acc)
    logits = logits * scale
    mask_BxTxS = visibility_mask(segment_ids, causal=causal, window=window)[:, None, None]
    # A finite fill keeps fully masked (padding) rows free of NaN in both passes.
    logits = jnp.where(mask_BxTxS, logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask_BxTxS, probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, hq, d).astype(q.dtype)
