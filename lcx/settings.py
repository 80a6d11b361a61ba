"""A run's settings: its config file resolved once, at the start, into frozen dataclasses.

`resolve(config)` turns the ml_collections config of `python -m lcx.main` (or a dict of
the same shape) into a `Settings`; every mode, and every function a user may call
directly with a config (`lcx.train.train_and_evaluate`, `lcx.memory.estimate`, ...),
resolves at its start, and everything below reads the dataclasses' attributes. A key
the config lacks, or one no section has, is a one-line error naming it: the defaults
live in one place, `configs/lm_tiny.py`, which every config starts from, so no module
keeps a `.get(key, default)` of its own.

Three sections hold, besides their own keys, a sub-section under the name of each entry
of a registry that takes settings: `config.data.<packing strategy>`,
`config.optimizer.<optimizer>`, `config.schedule.<schedule>`. They are gathered into the
section's `by_name` (read-only mappings, checked where used: `lcx.packing.
strategy_settings`, `lcx.train.optimizer`), so a new registry entry needs no field here,
and `as_dict` puts them back where the config had them. Packing strategies are known
here (lcx.packing sits below this module); the optimizers and schedules are lcx.train's,
above it, so there any key holding a dict is taken as one and lcx.train.optimizer checks
the names. The sharding rules stay the tuples `lcx.runtime.sharding` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from lcx.errors import UserError
from lcx.lora import LoRASettings
from lcx.packing import strategies
from lcx.runtime.sharding import MeshShape
from lcx.ttt import LaCTSettings

ORIGIN = "configs/lm_tiny.py"  # the config every other one starts from
DATA_FORMATS = ("text", "chat")  # config.data.format: files as documents, or conversations
LOSS_AVERAGES = ("token", "sequence")  # config.train.loss_average
# config.data.sources: each a corpus (paths as data.paths), its share of the rows, and the
# shortest document it keeps (ProLong's long sources keep only long documents).
SOURCE_KEYS = ("paths", "weight", "min_tokens")
STAGE_KEYS = ("name", "config", "evaluate")  # config.recipe.stages[i]


def _named(registry: Callable[[], Mapping] | None, what: str):
    """The `by_name` field of a section: {entry name: its settings} for the entries of
    `registry()` (looked up when a config is resolved) the config gives a section; with
    no registry, every key holding a dict."""
    return dataclasses.field(metadata={"registry": registry, "what": what})


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """`config.generate`: `mode=generate` (configs/lm_tiny.py documents each key)."""

    prompts: str
    prompts_file: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    share_prefix: bool
    slots: int
    token_budget: int


@dataclasses.dataclass(frozen=True)
class LengthEvalSettings:
    """`config.evals.length`: `mode=evaluate`'s length-following report
    (lcx.evals.length_following; configs/lm_tiny.py documents each key)."""

    enabled: bool
    file: str
    words: str
    samples: int
    temperature: float
    max_new_tokens: int
    slots: int


@dataclasses.dataclass(frozen=True)
class EvalsSettings:
    """`config.evals`: `mode=evaluate`."""

    tasks: str
    lengths: str
    examples: int
    seed: int
    generate: bool
    context: int
    loss_by_position: bool
    position_length: int
    documents: int
    length: LengthEvalSettings


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """`config.export`: `mode=export`."""

    dir: str
    max_shard_gb: float


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """`config.serve`: `mode=serve` (configs/lm_tiny.py documents each key)."""

    host: str
    port: int
    model_name: str
    max_context: int
    max_queue: int
    api_key: str
    drain_seconds: float
    slots: int
    token_budget: int


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """`config.engine`: the serving engine of `mode=generate` and `mode=serve`."""

    page_size: int
    num_pages: int
    prefix_cache: bool
    speculative: str
    speculative_k: int
    draft_checkpoint: str
    admission: str

    def engine_options(self) -> dict:
        """Engine keyword arguments (`lcx.generate.Engine`): 0 and "" mean none. A draft
        model is named by its checkpoint directory (`draft`), which the mode loads."""
        speculative = None
        if self.speculative:
            speculative = {"method": self.speculative, "k": self.speculative_k}
        if self.speculative == "draft":
            if not self.draft_checkpoint:
                raise UserError(
                    "engine.speculative='draft' needs engine.draft_checkpoint: a Hugging Face "
                    "checkpoint directory of a model with the same vocabulary"
                )
            speculative["draft"] = self.draft_checkpoint
        return {
            "page_size": self.page_size or None,
            "num_pages": self.num_pages or None,
            "prefix_cache": self.prefix_cache,
            "speculative": speculative,
            "admission": self.admission,
        }


@dataclasses.dataclass(frozen=True)
class InitSettings:
    """`config.init`: a Hugging Face checkpoint to start from ("" for none)."""

    hf_checkpoint: str
    rope_theta: float


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`config.data`: the corpus, the tokenizer and the packing strategy."""

    paths: str
    eval_paths: str
    sources: tuple  # ({"paths", "weight", "min_tokens"}, ...); empty: data.paths alone
    format: str
    skip_bad_lines: bool
    keep_binary: bool
    tokenizer: str
    add_bos: bool
    add_eos: bool
    join_directories: bool
    packing: str
    eval_fraction: float
    max_documents: int
    cache: bool
    shards: int
    # config.data.<strategy>: {"first_fit": {"num_bins": 128}, "dd": {...}, ...}
    by_name: Mapping[str, Mapping[str, Any]] = _named(
        lambda: strategies.REGISTRY, "a packing strategy of lcx.packing.REGISTRY"
    )

    def __post_init__(self):
        if self.format not in DATA_FORMATS:
            raise UserError(f"data.format={self.format!r}; valid: {DATA_FORMATS}")
        sources = tuple(dict(s) if isinstance(s, Mapping) else s for s in self.sources or ())
        for i, source in enumerate(sources):
            if not isinstance(source, dict) or set(source) != set(SOURCE_KEYS):
                raise UserError(
                    f"data.sources[{i}]={source!r}: needs exactly the keys {SOURCE_KEYS}"
                )
            if not source["weight"] > 0 or source["min_tokens"] < 0:
                raise UserError(
                    f"data.sources[{i}]: weight={source['weight']} must be > 0 and "
                    f"min_tokens={source['min_tokens']} >= 0"
                )
        object.__setattr__(self, "sources", sources)

    def packing_settings(self, name: str | None = None):
        """The settings object of strategy `name` (default: data.packing), or None for a
        strategy that takes none."""
        name = name or self.packing
        section = self.by_name[name] if name in self.by_name else None
        return strategies.strategy_settings(name, section)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """`config.train`: steps, batch, sequence length, logging and checkpoints."""

    steps: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    max_tokens: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoints: bool
    progress: bool
    allow_config_change: bool
    loss_average: str

    def __post_init__(self):
        if self.loss_average not in LOSS_AVERAGES:
            raise UserError(f"train.loss_average={self.loss_average!r}; valid: {LOSS_AVERAGES}")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """`config.optimizer`: the optimizer's name, clipping, and each one's settings."""

    name: str
    grad_clip: float
    # config.optimizer.<optimizer>: {"adamw": {"b1": 0.9, ...}, ...}
    by_name: Mapping[str, Mapping[str, Any]] = _named(
        None, "an optimizer of lcx.train.optimizer.OPTIMIZERS"
    )


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """`config.schedule`: the learning-rate schedule."""

    name: str
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    decay: str
    final_lr_fraction: float
    # config.schedule.<schedule>: {"power": {"a": 4.0, "b": -0.51}}
    by_name: Mapping[str, Mapping[str, Any]] = _named(
        None, "a schedule of lcx.train.optimizer.SCHEDULES"
    )


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """`config.batch`: AdAdaGrad's adaptive batch size (lcx.optim.AdaptiveBatchConfig)."""

    adaptive: bool
    test: str
    eta: float
    theta: float
    nu: float
    test_interval: int
    max_batch_size: int
    groups_per_micro_batch: int


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    """`config.recipe`: `mode=recipe`'s stages, run in order into one workdir
    (lcx.posttrain.recipe): each {"name", "config": nested overrides of this config,
    "evaluate": run mode=evaluate after it}."""

    stages: tuple

    def __post_init__(self):
        stages = tuple(dict(s) if isinstance(s, Mapping) else s for s in self.stages or ())
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict) or set(stage) != set(STAGE_KEYS):
                raise UserError(f"recipe.stages[{i}]: needs exactly the keys {STAGE_KEYS}")
            if not isinstance(stage["name"], str) or not stage["name"].isidentifier():
                raise UserError(f"recipe.stages[{i}].name={stage['name']!r}: a short identifier")
        names = [s["name"] for s in stages]
        if len(set(names)) != len(names):
            raise UserError(f"recipe.stages: names {names} must differ")
        object.__setattr__(self, "stages", stages)


@dataclasses.dataclass(frozen=True)
class SelfLengthenSettings:
    """`config.self_lengthen`: `mode=self_lengthen`'s rounds (lcx.posttrain.self_lengthen)."""

    instructions: str
    rounds: int
    samples: int
    retries: int
    max_new_tokens: int
    temperature: float
    slots: int
    min_ratio: float
    keep: float
    drop_lines: float
    rank_drop: bool
    seed: int
    epochs: float
    finetune: dict  # nested overrides of the config for each role's fine-tune

    def __post_init__(self):
        positive = ("rounds", "samples", "retries", "max_new_tokens", "slots")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"self_lengthen.{name}={getattr(self, name)} must be >= 1")
        if self.epochs < 0:
            raise UserError(
                f"self_lengthen.epochs={self.epochs} must be >= 0 (0: finetune's steps)"
            )
        if self.min_ratio <= 1 or not 0 < self.keep <= 1 or not 0 <= self.drop_lines < 1:
            raise UserError(
                f"self_lengthen: min_ratio={self.min_ratio} must be > 1, keep={self.keep} in "
                f"(0, 1], drop_lines={self.drop_lines} in [0, 1)"
            )
        object.__setattr__(self, "finetune", dict(self.finetune or {}))


@dataclasses.dataclass(frozen=True)
class RingSettings:
    """`config.ring`: the sequence layout of ring attention's rows."""

    layout: str


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`config.model`: lcx.model.TransformerConfig's fields as a config sets them
    (vocab_size 0: the tokenizer's, rounded up to 128)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    dtype: str
    param_dtype: str
    attention_implementation: str | None
    attention_window: int | None
    block_pattern: tuple
    lact: LaCTSettings
    remat: str
    scan_layers: bool
    lora: LoRASettings

    def fields(self) -> dict:
        """{name: value}, as TransformerConfig takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole config of a run, resolved."""

    mode: str
    seed: int
    generate: GenerateSettings
    evals: EvalsSettings
    export: ExportSettings
    init: InitSettings
    data: DataSettings
    train: TrainSettings
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    batch: BatchSettings
    mesh: MeshShape
    ring: RingSettings
    recipe: RecipeSettings
    self_lengthen: SelfLengthenSettings
    sharding_rules: tuple
    model: ModelSettings
    serve: ServeSettings
    engine: EngineSettings

    def replace(self, **sections) -> Settings:
        """A copy with whole sections, or fields of them as {section: {field: value}},
        replaced: `settings.replace(train={"steps": 8})`."""
        changes = {}
        for name, value in sections.items():
            if isinstance(value, Mapping):
                value = dataclasses.replace(getattr(self, name), **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)


def resolve(config) -> Settings:
    """`config` (an ml_collections ConfigDict, a dict of the same shape, or Settings) as
    Settings; a one-line UserError for a missing or unknown key."""
    if isinstance(config, Settings):
        return config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _build(Settings, values, "config")


def as_dict(value) -> Any:
    """Settings (or a section) as nested plain dicts, lists for tuples: what
    `config.to_dict()` gave for the same config (`by_name` entries back in their
    section), JSON-ready."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = as_dict(getattr(value, f.name))
            out.update(item if "registry" in f.metadata else {f.name: item})
        return out
    if isinstance(value, Mapping):
        return {k: as_dict(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [as_dict(v) for v in value]
    return value


def merged(base: dict, overrides: Mapping, where: str = "config") -> dict:
    """`base` (nested plain dicts: `as_dict`) with `overrides` put in, nested dicts merged
    key by key: how a recipe stage or a fine-tune changes a config. An override of a key
    the config does not have is a one-line error naming it."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if key not in out:
            raise UserError(f"{where}.{key}: the config has no such key; valid: {sorted(out)}")
        if isinstance(value, Mapping) and isinstance(out[key], dict):
            out[key] = merged(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _build(cls, values, where: str):
    """An instance of dataclass `cls` from the mapping `values`, every field given."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise UserError(f"{where}={values!r}: expected a section of keys {_names(cls)}")
    values, names = dict(values), _names(cls)
    named = [f for f in dataclasses.fields(cls) if "registry" in f.metadata]
    for f in named:  # sub-sections under registry names, gathered into `by_name`
        registry = f.metadata["registry"]
        keys = registry() if registry else [k for k, v in values.items() if isinstance(v, Mapping)]
        found = {k: values.pop(k) for k in list(values) if k in keys and k not in names}
        for key, section in found.items():
            if not isinstance(section, Mapping):
                raise UserError(
                    f"{where}.{key}={section!r}: expected a dict of {key}'s settings "
                    f"({key} is {f.metadata['what']})"
                )
        values[f.name] = found
    unknown = sorted(set(values) - set(names))
    if unknown:
        valid = names + [f"<{f.metadata['what']}>" for f in named]
        raise UserError(f"{where}: unknown key(s) {unknown}; valid: {valid}")
    missing = [n for n in names if n not in values]
    if missing:
        raise UserError(
            f"{where}: missing key(s) {missing}; a config starts from {ORIGIN}'s get_config()"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{n: _field(hints[n], values[n], f"{where}.{n}") for n in names})


def _field(kind, value, where: str):
    """`value` as the field type `kind` wants: a section, a read-only mapping, a tuple."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if typing.get_origin(kind) is Mapping:  # by_name: {name: {setting: value}}
        frozen = {k: types.MappingProxyType(dict(v)) for k, v in value.items()}
        return types.MappingProxyType(frozen)
    if kind is tuple:
        return _tuples(value)
    return value


def _tuples(value):
    """Lists (and tuples) as tuples, all the way down."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
