"""Train state, loss and the jitted steps: fused, accumulating, and the AdAdaGrad pass.

The state is a plain pytree (`TrainState`): parameters as a nested dict of arrays, the
optax state, the step, the sequences seen so far and the current batch size (the
adaptive controller's state), so orbax saves all of it and shardings map over it.

With one micro-batch per step the fused `train_step` does everything in one call. With
gradient accumulation, `accumulate_step` adds one micro-batch's gradient to an
`Accumulator` (the compiled shape never depends on how many micro-steps a step has)
and `apply_step` takes the optimizer step. For AdAdaGrad each micro-batch is split
into groups whose gradients feed the streaming batch-size statistics.

With `model.lora` (`lcx.lora`) the state's parameters are the adapters only:
the gradient, the optimizer state and the checkpoints cover nothing else. The frozen
base is a separate argument of every step (`frozen`, never donated), joined with the
adapters inside the loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcx import lora, optim
from lcx.model import Transformer
from lcx.runtime import sharding as sh
from lcx.runtime.params import abstract_model, param_shardings


class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    step: jax.Array
    params: dict
    opt_state: Any
    rows_seen: jax.Array  # sequences trained on, int32 [high, low] (`add_rows`)
    batch_size: jax.Array  # sequences per step now (grows under AdAdaGrad)


# Rows seen are counted in two int32 words, high * ROW_BASE + low: one int32 wraps after
# 2**31 rows (10**12 tokens in rows of 465), and JAX has no int64 without x64 mode.
ROW_BASE = 2**30


def add_rows(counter, rows):
    """The [high, low] counter plus `rows` (< ROW_BASE)."""
    low = counter[1] + rows
    return jnp.stack([counter[0] + low // ROW_BASE, low % ROW_BASE]).astype(jnp.int32)


def rows_as_float(counter):
    """The counter's value as a float32 (relative error 6e-8: what schedules need)."""
    return counter[0].astype(jnp.float32) * ROW_BASE + counter[1].astype(jnp.float32)


def host_rows(counter) -> int:
    """The counter's exact value on the host."""
    high, low = (int(x) for x in jax.device_get(counter))
    return high * ROW_BASE + low


def wide_rows(rows: int):
    """A counter holding `rows` (host int)."""
    return jnp.asarray([rows // ROW_BASE, rows % ROW_BASE], jnp.int32)


class Accumulator(NamedTuple):
    """Sums over the micro-batches of one step."""

    grad_sum: dict
    loss_sum: jax.Array
    target_count: jax.Array  # float32: targets, or the sum of their loss weights
    rows: jax.Array
    stats: optim.GradientStats | None


def trainable(model_cfg, tree):
    """(trained, frozen) halves of a parameter tree (or a tree of its shape): with
    model.lora the adapters and the base, else the whole tree and None."""
    if model_cfg.lora is None:
        return tree, None
    return lora.split(tree)


def _with_frozen(loss_sum, frozen: tuple):
    """`loss_sum` of the trained parameters joined with `frozen`: () or (the base,)."""
    if not frozen:
        return loss_sum
    return lambda params, batch: loss_sum(lora.join(params, frozen[0]), batch)


def _frozen_shardings(frozen) -> tuple:
    """The in_shardings entry of the frozen base: () without one."""
    return () if frozen is None else (jax.tree.map(lambda x: x.sharding, frozen),)


def _bind_frozen(jitted, frozen):
    """`jitted` called with the frozen base as its last argument (itself without one)."""
    if frozen is None:
        return jitted
    return lambda *args: jitted(*args, frozen)


def frozen_shardings(model_cfg, mesh, rules):
    """NamedShardings of model.lora's frozen base; None without LoRA."""
    _, abstract_params = abstract_model(model_cfg)
    return trainable(model_cfg, param_shardings(abstract_params, mesh, rules))[1]


def init_frozen(model_cfg, seed, shardings) -> dict:
    """model.lora's frozen base as the random init of `seed` makes it (the parameters a
    LoRA-off run of the seed starts from), placed with `shardings`."""

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed))))
        return trainable(model_cfg, params)[1]

    return jax.jit(init, out_shardings=shardings)()


def state_shardings(model_cfg, tx, mesh, rules):
    """NamedShardings for every leaf of TrainState, from the parameters' logical names
    (with model.lora, `params` and the optimizer state cover the adapters only)."""
    _, abstract_params = abstract_model(model_cfg)
    shardings = trainable(model_cfg, param_shardings(abstract_params, mesh, rules))[0]
    abstract_opt = jax.eval_shape(
        tx.init, trainable(model_cfg, nnx.to_pure_dict(abstract_params))[0]
    )
    replicated = sh.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, shardings, transform_non_params=lambda _: replicated
    )
    return TrainState(replicated, shardings, opt_shardings, replicated, replicated)


def _step_zero(params, tx, batch_size: int) -> TrainState:
    """The TrainState at step 0 around `params` (traced inside a jit)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        zero, params, tx.init(params), wide_rows(0), jnp.asarray(batch_size, jnp.int32)
    )


def init_state(model_cfg, tx, seed, shardings, batch_size: int) -> TrainState:
    """Initialise parameters and optimizer directly into their shardings (with
    model.lora the adapters; the unused base is never computed)."""

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed))))
        return _step_zero(trainable(model_cfg, params)[0], tx, batch_size)

    return jax.jit(init, out_shardings=shardings)()


def state_from_params(params, tx, shardings, batch_size: int) -> TrainState:
    """A TrainState at step 0 around given (already placed) parameters."""
    init = jax.jit(
        lambda p: _step_zero(p, tx, batch_size),
        in_shardings=(shardings.params,),
        out_shardings=shardings,
    )
    return init(params)


def lm_loss(logits_BxTxV, batch, average: str = "token"):
    """Summed next-token cross-entropy over real targets, and what it is a sum of.

    A target exists where the next position continues the same (non-padding)
    document; the last token of a document has none. A batch in a ring layout
    (`lcx.attention.ring.sequence_layout`) carries its `targets` and `target_mask`.
    A batch with `weights` (conversations: `lcx.posttrain.sft`) counts each target by
    its token's weight: (Σ w·ce, Σ w), so a weight-0 token changes neither the loss nor
    any gradient. `average`:
    - "token": (summed loss, target count or summed weight); the train step divides the
      sums of the global batch, Σ w·ce / Σ w;
    - "sequence": (the sum over documents of each one's mean loss, the number of
      documents with a target), so every packed document (conversation, or document
      piece) counts the same whatever its length.
    """
    if "targets" in batch:
        targets, mask = batch["targets"], batch["target_mask"].astype(bool)
        weights, seg = batch.get("target_weights"), batch["segment_ids"]
    else:
        tokens, seg = batch["tokens"], batch["segment_ids"]
        mask = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)
        targets, logits_BxTxV = tokens[:, 1:], logits_BxTxV[:, :-1]
        weights, seg = batch.get("weights"), seg[:, :-1]
        weights = None if weights is None else weights[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets)
    if weights is None and average == "token":
        return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask)
    w = mask.astype(jnp.float32) if weights is None else jnp.where(mask, weights, 0.0)
    weighted = jnp.where(w != 0, losses * w, 0.0)
    if average == "token":
        return jnp.sum(weighted), jnp.sum(w)
    return _sequence_means(weighted, w, seg)


def _sequence_means(weighted_BxT, weights_BxT, segment_ids_BxT):
    """(Σ over documents of Σ w·ce / Σ w, number of documents with Σ w > 0); a document
    is a (row, segment id) pair."""
    b, t = segment_ids_BxT.shape
    ids = jnp.arange(b)[:, None] * (t + 2) + jnp.clip(segment_ids_BxT, 0, t + 1)
    total = jax.ops.segment_sum(weighted_BxT.reshape(-1), ids.reshape(-1), b * (t + 2))
    weight = jax.ops.segment_sum(weights_BxT.reshape(-1), ids.reshape(-1), b * (t + 2))
    has = weight > 0
    return jnp.sum(jnp.where(has, total / jnp.where(has, weight, 1.0), 0.0)), jnp.sum(has)


def model_loss_sum(graphdef, average: str = "token"):
    """params, batch -> (summed loss, what it is a sum of): `lm_loss` of the model."""

    def loss_sum(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
        return lm_loss(logits, batch, average)

    return loss_sum


def _optimizer_update(tx, state: TrainState, grads, rows, seq_len):
    """One optimizer step on mean gradients `grads` of `rows` sequences."""
    rows_seen = add_rows(state.rows_seen, rows)
    tokens_seen = rows_as_float(rows_seen) * seq_len
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, tokens_seen=tokens_seen, batch_size=rows
    )
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, opt_state, rows_seen, state.batch_size)
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": optim.current_learning_rate(opt_state),
        "tokens_seen": tokens_seen,
    }
    return new_state, metrics


def row_equivalents(batch, seq_len: int):
    """Sequences of `seq_len` tokens the batch holds: its rows, or B * T / seq_len when
    the row length varies (Dataset Decomposition keeps B * T = batch_size * seq_len)."""
    b, t = batch["tokens"].shape
    return jnp.asarray(b * t // seq_len if t != seq_len else b, jnp.int32)


def make_train_step(graphdef, tx, shardings, batch_sharding, seq_len, loss_sum=None, frozen=None):
    """The fused `train_step(state, batch) -> (state, metrics)`, state donated.

    A batch of a new shape compiles a new step (jit's cache); `train_step.compiles`
    counts them. `loss_sum(params, batch) -> (sum, targets)` defaults to the model's
    next-token loss over independent rows. `frozen`: model.lora's base (placed), the
    jitted function's third argument, joined with the state's adapters in the loss.
    """
    loss_sum = loss_sum or model_loss_sum(graphdef)
    traces = [0]

    def train_step(state: TrainState, batch, *frozen):
        traces[0] += 1  # runs once per trace, i.e. per compiled shape
        joined = _with_frozen(loss_sum, frozen)

        def mean_loss(params):
            total, count = joined(params, batch)
            return total / jnp.maximum(count, 1), count

        (loss, count), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        rows = row_equivalents(batch, seq_len)
        state, metrics = _optimizer_update(tx, state, grads, rows, seq_len)
        return state, metrics | {"loss": loss, "target_tokens": count}

    replicated = sh.replicated(batch_sharding.mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding, *_frozen_shardings(frozen)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    call = _bind_frozen(jitted, frozen)

    def step(state: TrainState, batch):
        return call(state, batch)

    step.compiles = lambda: traces[0]
    step.jitted = jitted  # for .lower(...).compile() analyses
    return step


def _group_gradients(loss_sum, params, batch, groups):
    """Per-group summed gradients, losses and target counts (leading axis = group)."""
    split = {k: v.reshape((groups, v.shape[0] // groups) + v.shape[1:]) for k, v in batch.items()}
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    (losses, counts), grads = jax.vmap(grad_fn, in_axes=(None, 0))(params, split)
    return grads, losses, counts


def _group_means(grads, counts):
    """Per-token mean gradient of each group."""
    denom = jnp.maximum(counts, 1).astype(jnp.float32)
    return jax.tree.map(lambda g: g / denom.reshape((-1,) + (1,) * (g.ndim - 1)), grads)


def empty_accumulator(params, with_stats: bool) -> Accumulator:
    """A zero Accumulator shaped like `params`."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    stats = optim.stats_init(params) if with_stats else None
    zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    # The target count is a float: with loss weights it is their sum (Σ w).
    return Accumulator(zeros, zero_f, zero_f, zero_i, stats)


def make_accumulate_step(
    graphdef, batch_sharding, groups: int, average: str = "token", frozen=None
):
    """`accumulate(acc, params, micro_batch) -> acc`; groups > 0 also gathers statistics.
    `frozen`: model.lora's base, joined with the adapters `params`."""
    model_loss = model_loss_sum(graphdef, average)

    def accumulate(acc: Accumulator, params, batch, *frozen):
        loss_sum = _with_frozen(model_loss, frozen)
        rows = jnp.asarray(batch["tokens"].shape[0], jnp.int32)
        if groups:
            grads, losses, counts = _group_gradients(loss_sum, params, batch, groups)
            stats = optim.stats_merge(
                acc.stats, optim.stats_from_samples(_group_means(grads, counts))
            )
            grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
            loss, count = jnp.sum(losses), jnp.sum(counts)
        else:
            (loss, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params, batch)
            stats = acc.stats
        grad_sum = jax.tree.map(jnp.add, acc.grad_sum, grads)
        return Accumulator(
            grad_sum, acc.loss_sum + loss, acc.target_count + count, acc.rows + rows, stats
        )

    return _bind_frozen(jax.jit(accumulate, donate_argnums=0), frozen)


def make_projection_step(graphdef, groups: int, average: str = "token", frozen=None):
    """Second AdAdaGrad pass: `project(stats, params, micro_batch) -> stats` adds <g_j, mean>."""
    model_loss = model_loss_sum(graphdef, average)

    def project(stats, params, batch, *frozen):
        loss_sum = _with_frozen(model_loss, frozen)
        grads, _, counts = _group_gradients(loss_sum, params, batch, groups)
        return optim.stats_merge(
            stats, optim.projections_from_samples(_group_means(grads, counts), stats.mean)
        )

    return _bind_frozen(jax.jit(project), frozen)


def make_apply_step(tx, shardings, seq_len):
    """`apply(state, acc) -> (state, metrics)`: the optimizer step on accumulated sums."""

    def apply(state: TrainState, acc: Accumulator):
        denom = jnp.maximum(acc.target_count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, acc.grad_sum)
        state, metrics = _optimizer_update(tx, state, grads, acc.rows, seq_len)
        loss = acc.loss_sum / denom
        return state, metrics | {"loss": loss, "target_tokens": acc.target_count}

    return jax.jit(apply, out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(graphdef, param_shardings, batch_sharding, frozen=None):
    """The jitted `eval_step(params, batch) -> (loss_sum, target_count)`; `frozen`:
    model.lora's base, joined with the adapters `params`."""
    loss_sum = model_loss_sum(graphdef)

    def eval_step(params, batch, *frozen):
        return _with_frozen(loss_sum, frozen)(params, batch)

    shardings = (param_shardings, batch_sharding, *_frozen_shardings(frozen))
    return _bind_frozen(jax.jit(eval_step, in_shardings=shardings), frozen)
