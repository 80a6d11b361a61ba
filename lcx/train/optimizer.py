"""From `config.optimizer` and `config.schedule` to one optax transformation.

Every optimizer is wrapped by `lcx.optim.token_scheduled`: its learning rate is a
function of tokens seen (and the current batch size), so schedules stay right when the
batch size changes (AdAdaGrad, Dataset Decomposition). Warmup and decay lengths are
given in steps of the initial batch and converted to tokens.
"""

from __future__ import annotations

import dataclasses

import optax

from lcx import optim

OPTIMIZERS = {
    "adamw": (optax.adamw, ("b1", "b2", "eps", "weight_decay", "mask")),
    "lamb": (optim.lamb, ("b1", "b2", "eps", "weight_decay")),
    "adagrad": (optim.adagrad, ("initial_accumulator_value", "eps")),
    "adagrad_norm": (optim.adagrad_norm, ("initial_accumulator_value",)),
}
SCHEDULES = ("cosine", "wsd", "power")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`config.optimizer`: which optimizer, its hyper-parameters, gradient clipping."""

    name: str = "adamw"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    initial_accumulator_value: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.name!r}; valid: {sorted(OPTIMIZERS)}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """`config.schedule`: the learning-rate schedule, lengths in steps of the first batch."""

    name: str = "cosine"
    peak_lr: float = 3e-3  # the cap (max_lr) for "power"
    warmup_steps: int = 50
    decay_steps: int = 0  # wsd and power: length of the final decay
    decay: str = "linear"  # wsd and power: exponential | linear | 1-sqrt
    final_lr_fraction: float = 0.1
    power_a: float = 4.0
    power_b: float = -0.51

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r}; valid: {SCHEDULES}")


def make_schedule(cfg: ScheduleConfig, *, total_steps: int, batch_size: int, seq_len: int):
    """`schedule(tokens_seen, batch_size) -> learning rate` from the config."""
    tokens_per_step = batch_size * seq_len
    warmup = cfg.warmup_steps * tokens_per_step
    total = total_steps * tokens_per_step
    if cfg.name == "cosine":
        return optim.cosine_schedule(
            peak_lr=cfg.peak_lr,
            warmup_tokens=warmup,
            total_tokens=total,
            final_lr_fraction=cfg.final_lr_fraction,
        )
    phases = dict(
        warmup_tokens=warmup,
        decay_tokens=cfg.decay_steps * tokens_per_step,
        total_tokens=total,
        decay=cfg.decay,
        final_lr_fraction=cfg.final_lr_fraction,
    )
    if cfg.name == "wsd":
        return optim.wsd_schedule(peak_lr=cfg.peak_lr, **phases)
    return optim.power_schedule(
        batch_size=batch_size, max_lr=cfg.peak_lr, a=cfg.power_a, b=cfg.power_b, **phases
    )


def make_optimizer(cfg: OptimizerConfig, schedule) -> optax.GradientTransformationExtraArgs:
    """Clip, then the named optimizer driven by `schedule`; update takes tokens_seen, batch_size."""
    factory, accepted = OPTIMIZERS[cfg.name]
    values = dataclasses.asdict(cfg) | {"mask": optim.matrices_only}
    kwargs = {k: values[k] for k in accepted}
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optim.token_scheduled(factory, schedule, **kwargs),
    )
