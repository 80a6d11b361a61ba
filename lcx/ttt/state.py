"""A LaCT layer's per-sequence state for generation, and one engine step of it.

In the engine a sequence's fast weights update every `chunk_size` tokens counted from its
own start (position 0), as a document alone in a training row does: a token at position
p is applied with the weights after chunks 0 .. p // C - 1, and the chunk's keys, values,
learning rates and momentum rates wait in a buffer until its last token (position
C - 1 mod C) arrives, when the same `chunk_update` as training runs for that slot. The
engine cuts prompt chunks at multiples of C, so no step crosses a slot's chunk boundary.
Shape letters: S slots, H fast-weight heads, C chunk, D head dim, F hidden width, T row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcx.cache import AttentionCache
from lcx.ttt.fast_weights import (
    FastWeights,
    apply_fast_weights,
    chunk_update,
    row_norms,
    where_rows,
)


class LaCTCache(NamedTuple):
    """Per slot: the window attention's cache, fast weights, momentum, the open chunk."""

    attention: AttentionCache
    w: FastWeights  # [S, H, F, D] / [S, H, D, F], float32
    momentum: FastWeights | None
    k: jax.Array  # [S, H, C, D] the open chunk's keys (float32)
    v: jax.Array  # [S, H, C, D]
    lr: jax.Array  # [S, H, C, 3]
    momentum_rates: jax.Array  # [S, H, C]

    @property
    def slots(self) -> int:
        return self.attention.slots


def _any_per_slot(slots, slot_T, flag_T):
    """bool [S]: whether any token of each slot has the flag."""
    return jnp.zeros((slots,), bool).at[slot_T].max(flag_T)


def fast_weight_step(
    cache: LaCTCache,
    w_init: FastWeights,
    q,
    k,
    v,
    lr,
    momentum,
    segment_ids_T,
    positions_T,
    *,
    decode_rows,
    use_muon,
):
    """(updated state, outputs [T, H, D]) of one row's tokens; q, k, v [H, T, D].

    Slots whose sequence starts in the row (a token at position 0) restart from
    `w_init`; `decode_rows`: the first S tokens are slot i's decode token at index i.
    """
    slots, _, c, _ = cache.k.shape
    real = segment_ids_T > 0
    slot = jnp.clip(segment_ids_T - 1, 0, slots - 1)
    w0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (slots, *x.shape)).astype(jnp.float32), w_init)
    starts = _any_per_slot(slots, slot, real & (positions_T == 0))
    w = where_rows(starts, w0, cache.w)
    mom = cache.momentum
    if mom is not None:
        mom = where_rows(starts, jax.tree.map(jnp.zeros_like, mom), mom)

    q = jnp.swapaxes(q, 0, 1).astype(jnp.float32)[:, :, None, :]  # [T, H, 1, D]
    n = decode_rows
    parts = []
    if n:
        parts.append(apply_fast_weights(w, q[:n]))  # slot i's weights for token i
    if q.shape[0] > n:
        per_token = jax.tree.map(lambda a: a[slot[n:]], w)  # [T - n, H, F, D]
        parts.append(apply_fast_weights(per_token, q[n:]))
    out = jnp.concatenate(parts, axis=0)[:, :, 0] * real[:, None, None]

    index = positions_T % c
    row = jnp.where(real, slot, slots)  # padding writes nothing
    put = lambda buf, x: buf.at[row, :, index].set(x.astype(buf.dtype), mode="drop")  # noqa: E731
    buffers = dict(
        k=put(cache.k, jnp.swapaxes(k, 0, 1)),
        v=put(cache.v, jnp.swapaxes(v, 0, 1)),
        lr=put(cache.lr, jnp.swapaxes(lr, 0, 1)),
        momentum_rates=cache.momentum_rates
        if momentum is None
        else put(cache.momentum_rates, jnp.swapaxes(momentum, 0, 1)),
    )
    complete = _any_per_slot(slots, slot, real & (index == c - 1))

    def update(carry):
        """Every slot's chunk update, kept where its chunk completed."""
        w, mom = carry
        new_w, new_mom = chunk_update(
            w,
            mom,
            buffers["k"],
            buffers["v"],
            buffers["lr"],
            None if mom is None else buffers["momentum_rates"],
            jnp.ones((slots, 1, c), jnp.float32),
            row_norms(w0),
            chunk_size=c,
            use_muon=use_muon,
        )
        w = where_rows(complete, new_w, w)
        if mom is not None:
            mom = where_rows(complete, new_mom, mom)
        return w, mom

    w, mom = jax.lax.cond(jnp.any(complete), update, lambda carry: carry, (w, mom))
    return cache._replace(w=w, momentum=mom, **buffers), out
