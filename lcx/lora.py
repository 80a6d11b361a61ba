"""LoRA: low-rank adapters beside the frozen projections of a pretrained model.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021, arXiv 2106.09685):
a kernel W stays frozen and learns W + (alpha / rank) A B, with A [in, rank] and
B [rank, out], B zero at the start so step 0 computes the pretrained model. lcx's kernels
carry several axes (w_q [E, H, D], w_o [H, D, E]): an adapter sees the kernel's input and
output axes flattened and `flax.nnx.LoRA` does the product.

`config.model.lora` (`LoRASettings`): rank (0: off), alpha, and the targets, the kernels
`w_<target>` of the attention layers (q, k, v, o; LaCT layers get none) and of every
block's SwiGLU (gate, up, down). The adapter of `w_q` is the module `lora_q` beside it;
its `nnx.LoRAParam`s `lora_a` [in, rank] and `lora_b` [rank, out] (flattened axes) take
the kernel's logical axis names on their in / out side, so the sharding rules place them
like the kernel. `nnx.state(model, nnx.LoRAParam)` selects the adapters of a module; in
the pure-dict trees training keeps, `split` finds them by their `lora_` modules.

The pieces below the model (this module imports no model): the settings, the adapter
module, attaching adapters to a module's kernels, and the pure-dict operations training
and export use: `split` (adapters | base), `join`, and `merge_adapters` (W + (alpha /
rank) A B, the base layout a Hugging Face loader reads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from lcx.errors import UserError

# model.lora.targets: the projections an adapter may sit beside, and how many leading
# axes of each kernel `w_<target>` are its input (the rest are its output).
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
PREFIX = "lora_"  # the adapter of kernel `w_<target>` is the module `lora_<target>`


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """`config.model.lora`: the adapters' rank (0: no LoRA), alpha (the update is scaled
    by alpha / rank) and the kernels they adapt (keys of TARGETS)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 0:
            raise UserError(f"model.lora.rank={self.rank!r} must be an integer >= 0 (0: off)")
        if not self.alpha > 0:
            raise UserError(f"model.lora.alpha={self.alpha!r} must be > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise UserError(
                f"model.lora.targets={self.targets}: distinct names, at least one, from "
                f"{tuple(TARGETS)}"
            )

    @classmethod
    def of(cls, values) -> LoRASettings:
        """A LoRASettings from itself or a mapping (config.model.lora), keys checked."""
        if isinstance(values, cls):
            return values
        if not hasattr(values, "keys"):  # a dict, a Mapping or a ConfigDict
            raise UserError(f"model.lora={values!r}: expected a dict of rank, alpha, targets")
        values, valid = dict(values), [f.name for f in dataclasses.fields(cls)]
        if set(values) != set(valid):
            raise UserError(f"model.lora: keys {sorted(values)}; expected exactly {valid}")
        return cls(**values)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of the low-rank update."""
        return self.alpha / self.rank


class LoRA(nnx.LoRA):
    """`nnx.LoRA` beside a kernel of several input and output axes, scaled by alpha / rank.

    `x [..., *in] -> scale * (x A) B [..., *out]`, A [prod(in), rank] (He-uniform) and B
    [rank, prod(out)] (zeros) as float32 `nnx.LoRAParam`s; computed in `dtype`.
    """

    def __init__(self, in_shape, out_shape, axes, settings: LoRASettings, *, dtype, rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        in_axis, out_axis = axes[0], axes[len(in_shape)]
        super().__init__(
            math.prod(in_shape),
            settings.rank,
            math.prod(out_shape),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
            a_metadata={"out_sharding": (in_axis, None), "eager_sharding": False},
            b_metadata={"out_sharding": (None, out_axis), "eager_sharding": False},
        )
        self.in_ndim, self.out_shape, self.scale = len(in_shape), out_shape, settings.scale

    def __call__(self, x):
        flat = x.reshape(*x.shape[: x.ndim - self.in_ndim], -1)
        y = super().__call__(flat) * jnp.asarray(self.scale, self.dtype)
        return y.reshape(*y.shape[:-1], *self.out_shape)


def add_adapters(module: nnx.Module, settings: LoRASettings | None, *, dtype, rngs) -> None:
    """Give each kernel `w_<target>` of `module` that `settings` targets its adapter
    `lora_<target>` (nothing without settings). Called after the base is built, so the
    base's random init does not depend on LoRA."""
    if settings is None:
        return
    for target in settings.targets:
        kernel = getattr(module, f"w_{target}", None)
        if kernel is None:
            continue
        n_in, shape = TARGETS[target], kernel.shape
        axes = kernel.get_metadata().get("out_sharding") or (None,) * len(shape)
        adapter = LoRA(shape[:n_in], shape[n_in:], axes, settings, dtype=dtype, rngs=rngs)
        setattr(module, PREFIX + target, adapter)


def adapted(module: nnx.Module, target: str, y, x):
    """`y = x W_target` plus the adapter's update when `module` has one; else `y`."""
    adapter = getattr(module, PREFIX + target, None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


def _is_adapter(key) -> bool:
    return isinstance(key, str) and key.startswith(PREFIX)


def split(tree: dict) -> tuple[dict, dict]:
    """(adapters, base) of a parameter tree in `nnx.to_pure_dict` layout (or any tree of
    that shape: shardings, shapes), each keeping the nesting it had."""
    adapters, base = {}, {}
    for key, value in tree.items():
        if _is_adapter(key):
            adapters[key] = value
        elif isinstance(value, Mapping):
            a, b = split(value)
            if a:
                adapters[key] = a
            if b or not a:
                base[key] = b
        else:
            base[key] = value
    return adapters, base


def join(adapters: dict, base: dict) -> dict:
    """The whole parameter tree from its `split` halves."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = join(value, out.get(key, {})) if not _is_adapter(key) else value
    return out


def merge_adapters(params: dict, settings: LoRASettings) -> dict:
    """The base layout with every adapter folded in: W + (alpha / rank) A B, computed in
    float32 and stored in W's dtype; the adapters' entries dropped."""
    out = {}
    for key, value in params.items():
        if _is_adapter(key):
            continue
        if isinstance(value, Mapping):
            value = merge_adapters(value, settings)
        kernel = isinstance(key, str) and key.startswith("w_")
        adapter = params.get(PREFIX + key[2:]) if kernel else None
        if adapter is not None:
            delta = adapter["lora_a"].astype(jnp.float32) @ adapter["lora_b"]
            merged = value.astype(jnp.float32) + settings.scale * delta.reshape(value.shape)
            value = merged.astype(value.dtype)
        out[key] = value
    return out
