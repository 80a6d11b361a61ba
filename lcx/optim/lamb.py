"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", 2019, arXiv 1904.00962).

Per parameter tensor x with Adam direction r = m_hat / (sqrt(v_hat) + eps):
    x <- x - lr * phi(||x||) / ||r + wd x|| * (r + wd x),  phi = identity,
with the ratio taken as 1 when either norm is 0. As in the TF-Addons reference
(`exclude_from_layer_adaptation`) and NVIDIA apex, tensors outside `mask` (by default
every leaf with ndim < 2: biases and norm scales) get neither weight decay nor the
trust ratio, only the Adam step. `optax.lamb` applies the trust ratio to every leaf.

Built from optax's own pieces: scale_by_adam, add_decayed_weights, scale_by_trust_ratio.
"""

from __future__ import annotations

import jax
import optax

from lcx.optim._checks import check_non_negative, checked_mask, is_static_number


def matrices_only(params):
    """The default layer-adaptation mask: True for leaves with ndim >= 2."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def lamb(
    learning_rate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask=None,
) -> optax.GradientTransformation:
    """LAMB as an optax chain.

    Args:
      learning_rate: a float or an optax schedule of the step count.
      b1, b2: Adam moment decay rates.
      eps: added to sqrt(v_hat).
      weight_decay: decoupled weight decay (lambda), inside the trust ratio.
      mask: pytree of bools or a function params -> such a pytree: leaves that get
        weight decay and the trust ratio. Default `matrices_only`.
    """
    check_non_negative("learning_rate", learning_rate)
    check_non_negative("eps", eps)
    check_non_negative("weight_decay", weight_decay)
    for name, beta in (("b1", b1), ("b2", b2)):
        if is_static_number(beta) and not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}={beta} must be in [0, 1)")
    mask_fn = checked_mask(matrices_only if mask is None else mask, "lamb")
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.masked(optax.add_decayed_weights(weight_decay), mask_fn),
        optax.masked(optax.scale_by_trust_ratio(), mask_fn),
        optax.scale_by_learning_rate(learning_rate),
    )
