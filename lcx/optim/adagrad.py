"""AdaGrad and AdaGrad-Norm, the base steps of AdAdaGrad (Lau et al., "AdAdaGrad:
Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024, arXiv 2402.11215).

AdaGrad-Norm keeps one scalar: b_t^2 = b_{t-1}^2 + ||g_t||^2 and steps x -= lr / b_t * g_t.
Coordinate-wise AdaGrad is optax's own `optax.adagrad`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lcx.optim._checks import check_non_negative, check_positive


class ScaleByAdaGradNormState(NamedTuple):
    """b_t^2: the initial value plus the sum of squared gradient norms."""

    sum_of_squares: jax.Array


def scale_by_adagrad_norm(initial_accumulator_value: float = 1e-4) -> optax.GradientTransformation:
    """Scale updates by 1 / b_t with b_t^2 = b_{t-1}^2 + ||g_t||^2 (one scalar for all)."""
    check_positive("initial_accumulator_value", initial_accumulator_value)

    def init(params):
        del params
        return ScaleByAdaGradNormState(jnp.asarray(initial_accumulator_value, jnp.float32))

    def update(updates, state, params=None):
        del params
        total = state.sum_of_squares + optax.tree.norm(updates, squared=True)
        inv = jax.lax.rsqrt(total)
        updates = jax.tree.map(lambda g: (g * inv).astype(g.dtype), updates)
        return updates, ScaleByAdaGradNormState(total)

    return optax.GradientTransformation(init, update)


def adagrad_norm(learning_rate, initial_accumulator_value: float = 1e-4):
    """AdaGrad-Norm: x -= lr / b_t * g."""
    check_non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_adagrad_norm(initial_accumulator_value),
        optax.scale_by_learning_rate(learning_rate),
    )


def adagrad(learning_rate, initial_accumulator_value: float = 0.1, eps: float = 1e-7):
    """Coordinate-wise AdaGrad (optax's), with lcx's argument checks."""
    check_non_negative("learning_rate", learning_rate)
    check_non_negative("eps", eps)
    check_non_negative("initial_accumulator_value", initial_accumulator_value)
    return optax.adagrad(
        learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps
    )
