"""Next-token sampling per sequence: greedy, temperature, top-k, top-p (nucleus), seeded.

Top-p: Holtzman et al., "The Curious Case of Neural Text Degeneration" (arXiv 1904.09751).
Every row carries its own settings, so one jitted call serves a batch of requests with
different ones. A row's key is `fold_in(PRNGKey(seed), count)` with `count` the number of
tokens the request has generated, so its samples do not depend on which other requests
share the step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcx.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k={self.top_k} must be >= 1, or None for no limit")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1], or None for no limit")


def allowed_tokens(logits_SxV, top_k_S, top_p_S):
    """bool [S, V]: the tokens top-k (0: all) and then top-p (>= 1: all) leave to sample from."""
    v = logits_SxV.shape[-1]
    order = jnp.argsort(-logits_SxV, axis=-1)
    ranked = jnp.take_along_axis(logits_SxV, order, axis=-1)
    k = jnp.where(top_k_S > 0, jnp.minimum(top_k_S, v), v)
    in_top_k = jnp.arange(v)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better-ranked tokens
    keep_ranked = in_top_k & (before < top_p_S[:, None])  # the best token always stays
    keep = jnp.zeros_like(keep_ranked)
    return keep.at[jnp.arange(keep.shape[0])[:, None], order].set(keep_ranked)


def sample(logits_SxV, seed_S, count_S, temperature_S, top_k_S, top_p_S):
    """int32 [S]: each row's next token under its own settings.

    When every row is greedy the sort, softmax and draws of sampling are skipped
    (`lax.cond`), which on the CPU is most of a greedy decode step's sampling time.
    """
    logits_SxV = logits_SxV.astype(jnp.float32)
    greedy = jnp.argmax(logits_SxV, axis=-1).astype(jnp.int32)

    def drawn():
        """Each row's draw from its tempered, top-k / top-p masked distribution."""
        masked = _sampled_logits(logits_SxV, temperature_S, top_k_S, top_p_S)
        keys = jax.vmap(_key)(seed_S, count_S)
        tokens = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(temperature_S > 0, tokens, greedy)

    return jax.lax.cond(jnp.any(temperature_S > 0), drawn, lambda: greedy)


def verify_drafts(logits_NxV, draft_N, seed_N, count_N, temperature_N, top_k_N, top_p_N):
    """Speculative sampling of drafted tokens (Leviathan et al., arXiv 2211.17192; Chen et
    al., arXiv 2302.01318) for drafts that are certain (n-gram lookup: q is a point mass).

    Row n holds the target's logits for the token a draft proposes `draft_N[n]` for, the
    request's `count_N[n]`-th. Returns bool `accept` [N] (greedy: the draft is the argmax;
    sampling: u < p(draft), u uniform), int32 `residual` [N] (the token to emit where it is
    rejected: a draw from p without the draft, renormalised, which is max(p - q, 0); greedy:
    the argmax) and `plain` [N] (`sample`'s own draw: the bonus token after every draft of
    a row was accepted). Emitting drafts up to the first rejection, then the residual (or
    the bonus), draws each token from the target's distribution exactly.
    """
    logits_NxV = logits_NxV.astype(jnp.float32)
    greedy = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    plain = sample(logits_NxV, seed_N, count_N, temperature_N, top_k_N, top_p_N)

    def drawn():
        """Acceptance and residual draws under each row's sampling settings."""
        masked = _sampled_logits(logits_NxV, temperature_N, top_k_N, top_p_N)
        rows = jnp.arange(masked.shape[0])
        p_draft = jax.nn.softmax(masked, axis=-1)[rows, draft_N]
        keys = jax.vmap(_key)(seed_N, count_N)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
        without = masked.at[rows, draft_N].set(-jnp.inf)
        draws = jax.vmap(lambda k, x: jax.random.categorical(jax.random.fold_in(k, 2), x))
        residual = draws(keys, without).astype(jnp.int32)
        sampled = temperature_N > 0
        return jnp.where(sampled, u < p_draft, greedy == draft_N), jnp.where(
            sampled, residual, greedy
        )

    accept, residual = jax.lax.cond(
        jnp.any(temperature_N > 0), drawn, lambda: (greedy == draft_N, greedy)
    )
    return accept, residual, plain


def _key(seed, count):
    """The key of a request's `count`-th token."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), count)


def _sampled_logits(logits_SxV, temperature_S, top_k_S, top_p_S):
    """Logits tempered, with the tokens top-k and top-p leave out at -inf."""
    scaled = logits_SxV / jnp.where(temperature_S > 0, temperature_S, 1.0)[:, None]
    return jnp.where(allowed_tokens(scaled, top_k_S, top_p_S), scaled, -jnp.inf)


def settings_arrays(params: list[SamplingParams | None]):
    """(temperature, top_k, top_p, seed) host arrays for `sample`; None rows are greedy."""
    params = [p or SamplingParams() for p in params]
    return (
        np.asarray([p.temperature for p in params], np.float32),
        np.asarray([p.top_k or 0 for p in params], np.int32),
        # None: 2, above any cumulative mass, so float rounding never drops a tail token.
        np.asarray([2.0 if p.top_p is None else p.top_p for p in params], np.float32),
        np.asarray([p.seed for p in params], np.uint32),
    )
