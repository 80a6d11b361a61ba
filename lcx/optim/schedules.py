"""Learning-rate schedules as functions of tokens seen.

`power_schedule` is the Power scheduler (Shen et al., "Power Scheduler: A Batch Size
and Token Number Agnostic Learning Rate Scheduler", 2024, arXiv 2408.13359; reference
IBM dolomite-engine `PowerScheduler`):

    lr(n) = min(max_lr, batch_size * a * n**b)

with n the number of tokens trained and batch_size the number of sequences per step,
a linear warmup to lr(warmup_tokens), and an optional final decay phase over the last
`decay_tokens` of `total_tokens` (WSD style). Defaults a = 4, b = -0.51,
max_lr = 0.02 are the paper's fitted values for muP-parametrised models (*verify*
against the paper, arXiv 2408.13359, for other parametrisations). The decay defaults to the
exponential shape of the reference implementation, which reaches exactly
`final_lr_fraction` of the starting value at the end; "linear" and "1-sqrt" are the
other common WSD tails.

Because the schedule is a function of tokens seen (and of the current batch size),
it stays right when the batch size changes between steps: the learning rate at a
given number of tokens does not depend on the batch sizes taken to get there.
cosine_schedule and wsd_schedule use the same (tokens, batch_size) signature so the
training loop treats every schedule alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lcx.optim._checks import check_non_negative, check_positive

DECAYS = ("exponential", "linear", "1-sqrt")


def _decay_factor(kind: str, progress, final: float):
    """Multiplier at `progress` in [0, 1] of the decay phase: 1 at 0, `final` at 1."""
    progress = jnp.clip(progress, 0.0, 1.0)
    if kind == "exponential":
        e = math.e
        scale = (1 - final) * e / (e - 1)
        offset = (final * e - 1) / (e - 1)
        return jnp.maximum(scale * jnp.exp(-progress) + offset, final)  # no rounding below
    if kind == "linear":
        return 1 - (1 - final) * progress
    return final + (1 - final) * (1 - jnp.sqrt(progress))


def _check_phases(warmup_tokens, decay_tokens, total_tokens, decay, final_lr_fraction):
    """Validate the warmup and decay phase arguments."""
    check_non_negative("warmup_tokens", warmup_tokens)
    check_non_negative("decay_tokens", decay_tokens)
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r}; valid: {DECAYS}")
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(f"final_lr_fraction={final_lr_fraction} must be in [0, 1]")
    if decay_tokens and (total_tokens is None or total_tokens < warmup_tokens + decay_tokens):
        raise ValueError(
            f"decay_tokens={decay_tokens} needs total_tokens >= warmup_tokens + decay_tokens; "
            f"got total_tokens={total_tokens}, warmup_tokens={warmup_tokens}"
        )


def _with_decay(body, decay_tokens, total_tokens, decay, final_lr_fraction):
    """Wrap `body(n, batch)` with the final decay phase (a no-op when decay_tokens=0)."""
    if not decay_tokens:
        return body
    # Python floats: token counts pass 2**31 (an int argument would be parsed as int32).
    start, decay_tokens = float(total_tokens - decay_tokens), float(decay_tokens)

    def schedule(tokens, batch_size=None):
        tokens = jnp.asarray(tokens, jnp.float32)
        factor = _decay_factor(decay, (tokens - start) / decay_tokens, final_lr_fraction)
        decayed = body(jnp.minimum(tokens, start), batch_size) * factor
        return jnp.where(tokens > start, decayed, body(tokens, batch_size))

    return schedule


def power_schedule(
    *,
    batch_size: int,
    max_lr: float = 0.02,
    a: float = 4.0,
    b: float = -0.51,
    warmup_tokens: float = 0,
    decay_tokens: float = 0,
    total_tokens: float | None = None,
    decay: str = "exponential",
    final_lr_fraction: float = 0.0,
):
    """The Power scheduler: `schedule(tokens_seen, batch_size=None) -> learning rate`.

    Args:
      batch_size: sequences per step, the paper's beta; the default when the call
        does not pass the current batch size.
      max_lr: the cap (the paper's eta_max).
      a, b: the power law's coefficient and exponent; b must be negative.
      warmup_tokens: linear warmup from 0 to lr(warmup_tokens).
      decay_tokens, total_tokens: a final decay over [total - decay, total].
      decay: "exponential" (the reference's), "linear" or "1-sqrt".
      final_lr_fraction: where the decay ends, relative to its start.
    """
    check_positive("max_lr", max_lr)
    check_positive("a", a)
    check_positive("batch_size", batch_size)
    if b >= 0:
        raise ValueError(f"b={b} must be negative: the learning rate falls with tokens seen")
    _check_phases(warmup_tokens, decay_tokens, total_tokens, decay, final_lr_fraction)
    warmup_tokens = float(warmup_tokens)  # counts past 2**31 stay floats, never int32

    def power(tokens, beta):
        return jnp.minimum(max_lr, beta * a * jnp.maximum(tokens, 1.0) ** b)

    def body(tokens, current_batch=None):
        tokens = jnp.asarray(tokens, jnp.float32)
        beta = batch_size if current_batch is None else current_batch
        if not warmup_tokens:
            return power(tokens, beta)
        ramp = power(float(warmup_tokens), beta) * tokens / warmup_tokens
        return jnp.where(tokens < warmup_tokens, ramp, power(tokens, beta))

    return _with_decay(body, decay_tokens, total_tokens, decay, final_lr_fraction)


def wsd_schedule(
    *,
    peak_lr: float,
    warmup_tokens: float,
    decay_tokens: float,
    total_tokens: float,
    decay: str = "linear",
    final_lr_fraction: float = 0.0,
):
    """Warmup-stable-decay in tokens: linear warmup, constant, then the decay tail."""
    check_positive("peak_lr", peak_lr)
    _check_phases(warmup_tokens, decay_tokens, total_tokens, decay, final_lr_fraction)
    warmup_tokens = float(warmup_tokens)  # counts past 2**31 stay floats, never int32

    def body(tokens, batch_size=None):
        del batch_size
        tokens = jnp.asarray(tokens, jnp.float32)
        if not warmup_tokens:
            return jnp.full_like(tokens, peak_lr)
        return peak_lr * jnp.minimum(1.0, tokens / warmup_tokens)

    return _with_decay(body, decay_tokens, total_tokens, decay, final_lr_fraction)


def cosine_schedule(
    *, peak_lr: float, warmup_tokens: float, total_tokens: float, final_lr_fraction=0.1
):
    """Linear warmup then cosine decay to `final_lr_fraction * peak_lr`, in tokens."""
    check_positive("peak_lr", peak_lr)
    check_positive("total_tokens", total_tokens)
    check_non_negative("warmup_tokens", warmup_tokens)
    warmup_tokens, total_tokens = float(warmup_tokens), float(total_tokens)

    def schedule(tokens, batch_size=None):
        del batch_size
        tokens = jnp.asarray(tokens, jnp.float32)
        warm = peak_lr * tokens / max(warmup_tokens, 1)
        progress = jnp.clip((tokens - warmup_tokens) / max(total_tokens - warmup_tokens, 1), 0, 1)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * progress))
        decayed = peak_lr * (final_lr_fraction + (1 - final_lr_fraction) * cosine)
        return jnp.where(tokens < warmup_tokens, warm, decayed)

    return schedule


def token_scheduled(optimizer_factory, schedule, **hyperparams):
    """An optimizer whose learning rate follows `schedule(tokens_seen, batch_size)`.

    Built on `optax.inject_hyperparams`; `update` takes the extra arguments
    `tokens_seen` (absolute, after this step's batch) and `batch_size` (this step's
    sequences), so the rate is right whatever batch sizes came before.
    """
    static = tuple(k for k, v in hyperparams.items() if callable(v) or isinstance(v, str))
    inner = optax.inject_hyperparams(optimizer_factory, static_args=static)(
        learning_rate=0.0, **hyperparams
    )

    def update(updates, state, params=None, *, tokens_seen, batch_size, **extra):
        del extra
        lr = schedule(tokens_seen, batch_size)
        state = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(lr, jnp.float32))
        return inner.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate a `token_scheduled` optimizer used in its last update."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate")
