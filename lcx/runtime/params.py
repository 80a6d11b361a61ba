"""A model's parameters before any exist: their abstract shapes and where each one goes."""

from __future__ import annotations

from flax import nnx

from lcx.model import Transformer, TransformerConfig
from lcx.runtime import sharding as sh


def abstract_model(model_cfg: TransformerConfig):
    """The model's graph definition and abstract parameters (no allocation)."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def param_shardings(abstract, mesh, rules) -> dict:
    """NamedShardings of the abstract parameters (`nnx.to_pure_dict` layout) on `mesh`,
    from their logical axis names mapped by `rules`."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
    return sh.logical_to_sharding(specs, mesh, rules, nnx.to_pure_dict(abstract))
