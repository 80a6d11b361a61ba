"""Draft-model speculation: a small lcx model proposes each sequence's next k tokens.

Speculative decoding (Leviathan et al., ICML 2023, arXiv 2211.17192; Chen et al., arXiv
2302.01318): a draft model with the target's vocabulary proposes k tokens and the target
verifies them all in one step. The drafts here are the draft model's greedy choices, a
point mass each, so `lcx.generate.sampling.verify_drafts` (accept a draft with probability
p(draft), else draw from p without it) keeps the target's distribution exactly.

The draft model keeps its own cache, one `max_length` stretch per slot (`lcx.cache`), and
the host remembers which tokens each slot's stretch holds. Each call first feeds each
slot what its sequence has beyond what the stretch holds (the tokens accepted since the
last call, or a new request's whole prompt; a slot's new request keeps whatever prefix it
shares with the old one), in the engine's packed layout: one-token feeds at their slot's
decode place, longer ones in blocks of `CHUNK_QUERY_BLOCK`. Then k - 1 decode rows draft
the rest, all in one jitted call. Entries of rejected drafts stay behind the sequence's
end, hidden by causality, until new tokens overwrite them, as in the engine's own cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcx.cache import CHUNK_QUERY_BLOCK


class DraftModel:
    """Greedy k-token drafts for the engine's slots from a small lcx model."""

    def __init__(self, model, *, slots: int, max_length: int, k: int, cache_dtype=None):
        self.slots, self.k = slots, k
        graphdef, self._state = nnx.split(model)
        self._cache = model.init_cache(slots, max_length, cache_dtype)
        self._held = [np.zeros(0, np.int32) for _ in range(slots)]  # tokens in each stretch
        self._propose = _jitted_proposal(graphdef, k)

    def propose(self, sequences: dict[int, Sequence[int]]) -> dict[int, list[int]]:
        """k draft tokens to follow each given slot's sequence (its tokens so far)."""
        s, block = self.slots, CHUNK_QUERY_BLOCK
        feeds = {}  # slot -> (tokens its stretch keeps, the sequence)
        for slot, tokens in sequences.items():
            sequence = np.asarray(tokens, np.int32)
            held = self._held[slot][: len(sequence) - 1]  # the last token is always fed
            differs = np.flatnonzero(held != sequence[: len(held)])
            feeds[slot] = (int(differs[0]) if differs.size else len(held), sequence)
        needed = sum(
            -(-(len(seq) - kept) // block) for kept, seq in feeds.values() if len(seq) - kept > 1
        )
        blocks = 1 << (needed - 1).bit_length() if needed else 0  # compiles once per bucket
        width = s + blocks * block
        tokens, segment_ids, positions = (np.zeros(width, np.int32) for _ in range(3))
        last, active = np.zeros(s, np.int32), np.zeros(s, bool)
        at = s
        for slot, (kept, sequence) in feeds.items():
            feed = sequence[kept:]
            place = slot if len(feed) == 1 else at
            tokens[place : place + len(feed)] = feed
            segment_ids[place : place + len(feed)] = slot + 1
            positions[place : place + len(feed)] = np.arange(kept, len(sequence))
            last[slot], active[slot] = place + len(feed) - 1, True
            if len(feed) > 1:
                at += -(-len(feed) // block) * block
        row = dict(tokens=tokens, segment_ids=segment_ids, positions=positions, last=last)
        drafts, self._cache = self._propose(self._state, self._cache, row, active)
        drafts = np.asarray(drafts)
        for slot, (_, sequence) in feeds.items():  # the k - 1 drafts fed back are kept too
            self._held[slot] = np.concatenate([sequence, drafts[slot, : self.k - 1]])
        return {slot: drafts[slot].tolist() for slot in feeds}


def _proposal(graphdef, k, state, cache, row, active_S):
    """The feed row's forward, then k - 1 greedy decode rows: drafts [S, k] and the cache."""
    model = nnx.merge(graphdef, state)
    s = active_S.shape[0]
    logits, cache = model(
        row["tokens"][None],
        row["segment_ids"][None],
        row["positions"][None],
        cache=cache,
        logits_at=row["last"][None],
        decode_rows=s,
    )
    first = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)
    segment_ids = jnp.where(active_S, jnp.arange(1, s + 1, dtype=jnp.int32), 0)[None]

    def draft_one(carry, _):
        """Feed each slot's latest draft at its next position; the next draft."""
        cache, token_S, position_S = carry
        logits, cache = model(
            token_S[None],
            segment_ids,
            position_S[None],
            cache=cache,
            logits_at=jnp.arange(s, dtype=jnp.int32)[None],
            decode_rows=s,
        )
        token_S = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)
        return (cache, token_S, position_S + 1), token_S

    start = row["positions"][row["last"]] + 1
    (cache, _, _), rest_KxS = jax.lax.scan(draft_one, (cache, first, start), None, length=k - 1)
    return jnp.concatenate([first[:, None], rest_KxS.T], axis=1), cache


@functools.lru_cache(maxsize=16)
def _jitted_proposal(graphdef, k):
    """The jitted proposal of a draft model graph, shared by every engine of that graph."""
    return jax.jit(functools.partial(_proposal, graphdef, k), donate_argnums=1)
