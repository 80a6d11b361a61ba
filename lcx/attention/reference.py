"""Pure-jnp packed (segmented) attention: the reference every implementation is tested against.

Semantics (the lcx attention contract): query t attends key s iff
`segment_ids[t] == kv_segment_ids[s] != 0`, and when causal `kv_positions[s] <=
q_positions[t]`, and with a window `|q_positions[t] - kv_positions[s]| < window` (for
causal attention: `q_positions[t] - kv_positions[s] < window`). Queries that see no key
return exactly 0 with finite gradients; their log-sum-exp is -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcx.attention.kernel_common import products_precision
from lcx.attention.segments import Segments, check_attention_args, segments_of


def visibility_mask(
    segment_ids_BxT,
    *,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    causal=True,
    window=None,
):
    """Boolean [B, Tq, Tk] mask of which key each query may see."""
    seg = Segments(jnp.asarray(segment_ids_BxT), kv_segment_ids, q_positions, kv_positions).filled()
    q_pos, kv_pos = seg.q_positions[:, :, None], seg.kv_positions[:, None, :]
    mask = (seg.q_ids[:, :, None] == seg.kv_ids[:, None, :]) & (seg.q_ids[:, :, None] != 0)
    if causal:
        mask &= kv_pos <= q_pos
    if window is not None:
        mask &= jnp.abs(q_pos - kv_pos) < window
    return mask


def reference_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    causal=True,
    window=None,
    scale=None,
    return_lse=False,
):
    """Packed attention in plain jnp; O(Tq * Tk) memory, for tests and small rows.

    Args:
      q: [B, Tq, Hq, D] queries.
      k, v: [B, Tk, Hkv, D] keys and values, Hq % Hkv == 0.
      segment_ids: int [B, Tq]; 0 is padding. None means one document per row.
      kv_segment_ids: int [B, Tk]; default `segment_ids` (then Tq == Tk).
      q_positions, kv_positions: int [B, Tq] / [B, Tk]; default the index in the row.
      causal: mask keys whose position is after the query's.
      window: if set, a query sees only keys with |q_pos - kv_pos| < window.
      scale: logit scale, default 1/sqrt(D).
      return_lse: also return the float32 [B, Tq, Hq] natural log-sum-exp of the
        scaled logits over the visible keys (-inf where none).

    Returns:
      [B, Tq, Hq, D] in q's dtype, exactly 0 for queries that see no key; with
      `return_lse`, the pair (out, lse).
    """
    check_attention_args(
        q,
        k,
        v,
        segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        window=window,
    )
    seg = segments_of(q, k, segment_ids, kv_segment_ids, q_positions, kv_positions)
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q_BxTxKxGxD = q.reshape(b, tq, hkv, hq // hkv, d)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 for bf16, float64 under x64
    prec = products_precision(q.dtype)
    logits = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k, preferred_element_type=acc, precision=prec
    )
    logits = logits * scale
    mask_BxTxS = visibility_mask(
        seg.q_ids,
        kv_segment_ids=seg.kv_ids,
        q_positions=seg.q_positions,
        kv_positions=seg.kv_positions,
        causal=causal,
        window=window,
    )[:, None, None]
    # A finite fill keeps rows that see nothing free of NaN in both passes.
    logits = jnp.where(mask_BxTxS, logits, jnp.finfo(acc).min)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.where(mask_BxTxS, jnp.exp(logits - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    seen = total > 0
    probs = e / jnp.where(seen, total, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, precision=prec)
    out = out.reshape(b, tq, hq, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)[..., 0]
    lse_BxTxH = jnp.moveaxis(lse.reshape(b, hq, tq), 1, 2)
    return out, lse_BxTxH.astype(jnp.promote_types(acc, jnp.float32))
