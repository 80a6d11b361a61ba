"""From `config.optimizer` and `config.schedule` to one optax transformation.

Every optimizer is wrapped by `lcx.optim.token_scheduled`: its learning rate is a
function of tokens seen (and the current batch size), so schedules stay right when the
batch size changes (AdAdaGrad, Dataset Decomposition). Warmup and decay lengths are
given in steps of the initial batch and converted to tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping

import optax

from lcx import optim
from lcx.errors import UserError


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A registered optimizer: `factory(learning_rate, **config.optimizer.<name>)`."""

    factory: Callable[..., optax.GradientTransformation]
    decay_matrices_only: bool = False  # pass mask=lcx.optim.matrices_only (no decay on norms)


# `config.optimizer.name` -> optimizer; its hyper-parameters live in config.optimizer.<name>.
OPTIMIZERS: Mapping[str, Optimizer] = types.MappingProxyType(
    {
        "adamw": Optimizer(optax.adamw, decay_matrices_only=True),
        "lamb": Optimizer(optim.lamb),
        "adagrad": Optimizer(optim.adagrad),
        "adagrad_norm": Optimizer(optim.adagrad_norm),
    }
)


def _settings_of(section: str, name: str, cfg, accepted) -> dict:
    """config.<section>.<name> (`cfg`: lcx.settings' OptimizerSettings or ScheduleSettings)
    as a dict, its keys checked against `accepted`; {} for an entry that takes no settings
    of its own (and has no section)."""
    registry = OPTIMIZERS if section == "optimizer" else SCHEDULES
    unknown = sorted(set(cfg.by_name) - set(registry))
    if unknown:
        key = unknown[0]
        raise UserError(f"{section}.{key}: unknown {section} {key!r}; valid: {sorted(registry)}")
    if not accepted:
        return {}
    if name not in cfg.by_name:
        raise UserError(f"{section}.{name} is needed: a dict of {sorted(accepted)}")
    settings = dict(cfg.by_name[name])
    unknown = set(settings) - set(accepted)
    if unknown:
        raise UserError(
            f"{section}.{name}: unknown {sorted(unknown)}; {name} takes {sorted(accepted)}"
        )
    return settings


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`config.optimizer`: the named optimizer, its hyper-parameters, gradient clipping."""

    name: str
    grad_clip: float
    settings: tuple  # the named optimizer's hyper-parameters, sorted (key, value) pairs

    @classmethod
    def of(cls, cfg) -> OptimizerConfig:
        """From config.optimizer: name, grad_clip and the section under the name."""
        name = cfg.name
        if name not in OPTIMIZERS:
            raise UserError(f"optimizer.name={name!r}; valid: {sorted(OPTIMIZERS)}")
        params = inspect.signature(OPTIMIZERS[name].factory).parameters
        accepted = [p for p in params if p not in ("learning_rate", "mask")]
        settings = _settings_of("optimizer", name, cfg, accepted)
        return cls(name, cfg.grad_clip, tuple(sorted(settings.items())))


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """`config.schedule`: the learning-rate schedule, lengths in steps of the first batch."""

    name: str
    peak_lr: float  # the cap (max_lr) for "power"
    warmup_steps: int
    decay_steps: int  # wsd and power: length of the final decay
    decay: str  # wsd and power: exponential | linear | 1-sqrt
    final_lr_fraction: float
    settings: tuple = ()  # the named schedule's own settings (config.schedule.<name>)

    @classmethod
    def of(cls, cfg) -> ScheduleConfig:
        """From config.schedule: the shared fields and the section under the name."""
        name = cfg.name
        if name not in SCHEDULES:
            raise UserError(f"schedule.name={name!r}; valid: {sorted(SCHEDULES)}")
        shared = {
            f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name != "settings"
        }
        params = inspect.signature(SCHEDULES[name]).parameters.values()
        accepted = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        settings = _settings_of("schedule", name, cfg, accepted)
        return cls(**shared, settings=tuple(sorted(settings.items())))


def _cosine(cfg: ScheduleConfig, phases: dict, batch_size: int):
    """Linear warmup, cosine decay to final_lr_fraction * peak_lr."""
    return optim.cosine_schedule(
        peak_lr=cfg.peak_lr,
        warmup_tokens=phases["warmup_tokens"],
        total_tokens=phases["total_tokens"],
        final_lr_fraction=cfg.final_lr_fraction,
    )


def _wsd(cfg: ScheduleConfig, phases: dict, batch_size: int):
    """Warmup, stable, decay."""
    return optim.wsd_schedule(peak_lr=cfg.peak_lr, **phases)


def _power(cfg: ScheduleConfig, phases: dict, batch_size: int, *, a: float, b: float):
    """The power scheduler: lr = min(max_lr, batch_size * a * tokens^b)."""
    return optim.power_schedule(batch_size=batch_size, max_lr=cfg.peak_lr, a=a, b=b, **phases)


# `config.schedule.name` -> builder(cfg, phases, batch_size, **config.schedule.<name>): its
# keyword-only arguments are the schedule's own settings.
SCHEDULES: Mapping[str, Callable] = types.MappingProxyType(
    {"cosine": _cosine, "wsd": _wsd, "power": _power}
)


def make_schedule(cfg: ScheduleConfig, *, total_steps: int, batch_size: int, seq_len: int):
    """`schedule(tokens_seen, batch_size) -> learning rate` from the config."""
    tokens_per_step = batch_size * seq_len
    phases = dict(
        warmup_tokens=cfg.warmup_steps * tokens_per_step,
        decay_tokens=cfg.decay_steps * tokens_per_step,
        total_tokens=total_steps * tokens_per_step,
        decay=cfg.decay,
        final_lr_fraction=cfg.final_lr_fraction,
    )
    try:
        return SCHEDULES[cfg.name](cfg, phases, batch_size, **dict(cfg.settings))
    except ValueError as e:  # lcx.optim names its arguments; say which config this is
        raise UserError(
            f"schedule.name={cfg.name!r}: {e} (tokens: steps * train.batch_size * train.seq_len)"
        ) from e


def make_optimizer(cfg: OptimizerConfig, schedule) -> optax.GradientTransformationExtraArgs:
    """Clip, then the named optimizer driven by `schedule`; update takes tokens_seen, batch_size."""
    optimizer = OPTIMIZERS[cfg.name]
    kwargs = dict(cfg.settings)
    if optimizer.decay_matrices_only:
        kwargs["mask"] = optim.matrices_only
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optim.token_scheduled(optimizer.factory, schedule, **kwargs),
    )
