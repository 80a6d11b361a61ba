"""Log-probabilities of given tokens, many sequences per packed row.

What a server's `echo` + `logprobs` and lm-evaluation-harness's `loglikelihood` need:
for every token of a sequence after its first, log p(token | the tokens before it) and
the most likely alternatives there. Sequences are packed by `first_fit_decreasing` into
rows of `context` tokens (attention stays within each, `lcx.packing.rows.packed_row`),
so one forward scores many short requests; one row width means one compilation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcx.packing import first_fit_decreasing
from lcx.packing.rows import packed_row


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """One sequence's scores, for tokens 1..n-1: `logprob` [n-1], `top_ids` and
    `top_logprobs` [n-1, top] (best first)."""

    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @property
    def is_greedy(self) -> np.ndarray:
        """bool [n-1]: whether each token is the model's most likely one there."""
        return self.logprob >= self.top_logprobs[:, 0]


class PackedScorer:
    """Scores token sequences of at most `context` tokens with `model`.

    Args:
      model: an lcx `Transformer`.
      context: the row width; a longer sequence is a ValueError (never truncated).
      pad_id: the id that fills a row's tail.
      top: alternatives reported per token (>= 1).
    """

    def __init__(self, model, context: int, pad_id: int, *, top: int = 5):
        if top < 1:
            raise ValueError(f"top={top} must be >= 1")
        self.context, self.pad_id, self.top = context, pad_id, top
        graphdef, self._state = nnx.split(model)
        k = min(top, model.cfg.vocab_size)

        @jax.jit
        def forward(state, tokens, segment_ids, positions):
            """Each position's log p(next token) and the top-k there."""
            logits = nnx.merge(graphdef, state)(tokens, segment_ids, positions)[:, :-1]
            logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            chosen = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
            top_logprobs, top_ids = jax.lax.top_k(logprobs, k)
            return chosen, top_ids, top_logprobs

        self._forward = forward

    def score(self, sequences: Sequence[Sequence[int]]) -> list[TokenScores]:
        """The scores of each sequence (each needs at least one token)."""
        lengths = [len(s) for s in sequences]
        for i, n in enumerate(lengths):
            if not 1 <= n <= self.context:
                raise ValueError(
                    f"sequence {i} has {n} tokens; the scorer takes 1 to context={self.context}"
                )
        out: list[TokenScores | None] = [None] * len(sequences)
        for members in first_fit_decreasing(lengths, self.context):
            row = packed_row([sequences[i] for i in members], self.context, self.pad_id)
            arrays = (jnp.asarray(row[k])[None] for k in ("tokens", "segment_ids", "positions"))
            chosen, top_ids, top_logprobs = (
                np.asarray(x[0]) for x in self._forward(self._state, *arrays)
            )
            start = 0
            for i in members:
                span = slice(start, start + lengths[i] - 1)
                out[i] = TokenScores(chosen[span], top_ids[span], top_logprobs[span])
                start += lengths[i]
        return out
