"""Train state, optimizer, loss and the jitted train and eval steps.

The state is a plain pytree (`TrainState`): parameters as a nested dict of arrays, the
optax state and the step, so orbax saves it as is and shardings map over it directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcx.model import Transformer, TransformerConfig
from lcx.train import sharding as sh


class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    step: jax.Array
    params: dict
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping."""

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup to the peak, cosine decay to `end_lr_fraction` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(cfg.total_steps - 1, 0)),
        decay_steps=max(cfg.total_steps, 1),
        end_value=cfg.learning_rate * cfg.end_lr_fraction,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax chain; weight decay only on matrices (not norms)."""
    schedule = learning_rate_schedule(cfg)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def abstract_model(model_cfg: TransformerConfig):
    """The model's graph definition and abstract parameters (no allocation)."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    return graphdef, params


def state_shardings(model_cfg, tx, mesh, rules):
    """NamedShardings for every leaf of TrainState, from the parameters' logical names."""
    _, abstract_params = abstract_model(model_cfg)
    param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    param_shardings = sh.logical_to_sharding(param_specs, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: sh.replicated(mesh),
    )
    return TrainState(step=sh.replicated(mesh), params=param_shardings, opt_state=opt_shardings)


def init_state(model_cfg, tx, seed, shardings) -> TrainState:
    """Initialise parameters and optimizer directly into their shardings."""

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed))))
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    return jax.jit(init, out_shardings=shardings)()


def lm_loss(logits_BxTxV, batch):
    """Summed next-token cross-entropy over real targets, and their count.

    A target exists where the next position continues the same (non-padding)
    document; the last token of a document has none.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    mask = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1], tokens[:, 1:])
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask)


def make_train_step(graphdef, tx, shardings, batch_sharding):
    """The jitted `train_step(state, batch) -> (state, metrics)`, state donated."""

    def train_step(state: TrainState, batch):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
            loss_sum, count = lm_loss(logits, batch)
            return loss_sum / jnp.maximum(count, 1), count

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "target_tokens": count}
        return TrainState(state.step + 1, params, opt_state), metrics

    metrics_sharding = sh.replicated(batch_sharding.mesh)
    return jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, metrics_sharding),
        donate_argnums=0,
    )


def make_eval_step(graphdef, param_shardings, batch_sharding):
    """The jitted `eval_step(params, batch) -> (loss_sum, target_count)`."""

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
        return lm_loss(logits, batch)

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))
