"""One training step from the data iterator: fused, or accumulated over micro-batches.

`StepRunner` hides the difference. With `config.batch.adaptive`, every
`test_interval` steps it runs AdAdaGrad's second pass over the step's micro-batches,
asks the chosen test for b*, and grows the batch (more micro-steps, same shapes).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from lcx import optim
from lcx.errors import UserError
from lcx.packing import batch_stats
from lcx.train import step as steplib
from lcx.train.chunkflow import chunkflow_loss_sum


def merge_host_stats(parts: list[dict]) -> dict:
    """batch_stats of several micro-batches as one."""
    real = sum(p["real_tokens"] for p in parts)
    fill = [1 - p["padding_fraction"] for p in parts]
    return {
        "real_tokens": real,
        "target_tokens": sum(p["target_tokens"] for p in parts),
        "padding_fraction": float(1 - np.mean(fill)),
    }


class StepRunner:
    """Runs step after step for an Experiment; holds the compiled functions."""

    def __init__(self, exp, batch_size: int):
        self.exp = exp
        self.micro = exp.micro_batch_size
        if batch_size < self.micro or batch_size % self.micro:
            raise UserError(
                f"train.batch_size={batch_size} must be a positive multiple of the "
                f"micro-batch size {self.micro}"
            )
        self.adaptive = exp.adaptive
        self.batch_size = batch_size
        seq_len, average = exp.config.train.seq_len, exp.config.train.loss_average
        frozen = exp.frozen_params()  # model.lora's base; None without LoRA
        if self.adaptive is None and batch_size == self.micro:
            loss_sum = steplib.model_loss_sum(exp.graphdef, average)
            if exp.packing.dependent_rows:  # rows of one document depend (ChunkFlow)
                if average != "token":
                    raise UserError(
                        f"train.loss_average={average!r}: data.packing={exp.config.data.packing!r}"
                        " trains documents across rows; only 'token' is supported there"
                    )
                loss_sum = chunkflow_loss_sum(exp.graphdef)
            self.fused = steplib.make_train_step(
                exp.graphdef, exp.tx, exp.shardings, exp.batch_sharding, seq_len, loss_sum, frozen
            )
            return
        self.fused = None
        groups = self.adaptive.groups_per_micro_batch if self.adaptive else 0
        self.empty = jax.jit(functools.partial(steplib.empty_accumulator, with_stats=groups > 0))
        self.accumulate = steplib.make_accumulate_step(
            exp.graphdef, exp.batch_sharding, groups, average, frozen
        )
        self.apply = steplib.make_apply_step(exp.tx, exp.shardings, seq_len)
        if groups:
            self.project = steplib.make_projection_step(exp.graphdef, groups, average, frozen)

    def _next(self, data_iter):
        """The next micro-batch on device, and its host statistics."""
        batch = next(data_iter)
        return self.exp.device_batch(batch), batch_stats(batch)

    def __call__(self, state, data_iter, step: int):
        """One optimizer step: (state, device metrics, host batch statistics)."""
        if self.fused is not None:
            batch, stats = self._next(data_iter)
            state, metrics = self.fused(state, batch)
            extra = {
                "batch_size": self.batch_size,
                "compiles": self.fused.compiles(),  # > 1 when row shapes vary (DD)
                "row_len": int(batch["tokens"].shape[1]),
            }
            return state, metrics | extra, stats
        testing = self.adaptive is not None and self.adaptive.is_test_step(step)
        acc, kept, host = self.empty(state.params), [], []
        for _ in range(self.batch_size // self.micro):
            batch, stats = self._next(data_iter)
            acc = self.accumulate(acc, state.params, batch)
            host.append(stats)
            if testing:
                kept.append(batch)
        extra = {"batch_size": self.batch_size}
        if testing:
            extra["suggested_batch_size"] = self._grow(acc.stats, state.params, kept)
        state, metrics = self.apply(state, acc)
        if self.batch_size != extra["batch_size"]:
            grown = jax.device_put(np.int32(self.batch_size), state.batch_size.sharding)
            state = state._replace(batch_size=grown)
        return state, metrics | extra, merge_host_stats(host)

    def _grow(self, stats, params, batches) -> float:
        """Second pass, then b* of the configured test; updates self.batch_size."""
        for batch in batches:
            stats = self.project(stats, params, batch)
        per_group = self.micro // self.adaptive.groups_per_micro_batch
        cfg = self.adaptive
        suggested = optim.suggested_batch_sizes(
            stats, samples_per_gradient=per_group, eta=cfg.eta, theta=cfg.theta, nu=cfg.nu
        )[cfg.test]
        suggested = float(suggested)
        self.batch_size = cfg.next_batch_size(self.batch_size, suggested)
        return suggested
