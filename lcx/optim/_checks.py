"""Argument checks shared by the lcx optimizers."""

from __future__ import annotations

import jax
import numpy as np


def is_static_number(value) -> bool:
    """A Python or numpy number (not a schedule, array or tracer, e.g. under inject_hyperparams)."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def check_non_negative(name: str, value) -> None:
    """ValueError unless a static `value` is >= 0 (schedules and traced values pass)."""
    if not is_static_number(value):
        return
    if float(value) < 0:
        raise ValueError(f"{name}={value} must be >= 0")


def check_positive(name: str, value) -> None:
    """ValueError unless a static `value` is > 0."""
    if not is_static_number(value):
        return
    if float(value) <= 0:
        raise ValueError(f"{name}={value} must be > 0")


def checked_mask(mask, owner: str):
    """A mask function that refuses a mask pytree not shaped like the parameters."""

    def mask_fn(params):
        tree = mask(params) if callable(mask) else mask
        if jax.tree.structure(tree) != jax.tree.structure(params):
            raise ValueError(
                f"{owner}: mask has structure {jax.tree.structure(tree)}, but the parameters "
                f"have {jax.tree.structure(params)}; give one bool per parameter leaf"
            )
        return tree

    return mask_fn
