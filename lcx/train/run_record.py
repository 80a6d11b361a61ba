"""The workdir's record of the run it holds: the config it started with, checked on resume.

A fresh run writes `WORKDIR/config.json`. A resume compares the current config with it:
keys in RESUMABLE may differ (the run continues correctly), any other difference stops
with one line naming the keys, unless `train.allow_config_change` is set. A changed
`train.batch_size` continues through gradient accumulation in micro-batches of the
run's first micro-batch size (the data iterator in the checkpoint draws those), and the
learning-rate schedule keeps the first batch size's step lengths, so it stays a function
of tokens seen.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from lcx.errors import UserError
from lcx.settings import as_dict, resolve

RECORD = "config.json"

# Keys that may change between the first start and a resume.
RESUMABLE = frozenset(
    {
        "mode",
        "train.steps",
        "train.max_tokens",
        "train.batch_size",  # continued in micro-batches of the first run's size
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.async_checkpoints",
        "train.progress",
        "train.allow_config_change",
        "data.cache",
        "model.attention_implementation",  # the same function, computed another way
        "ring.layout",  # the same function: the loss reads targets in the same layout
        # The same function on any mesh: a checkpoint restores into the new shardings.
        "mesh.data",
        "mesh.fsdp",
        "mesh.tensor",
        "mesh.sequence",
        "sharding_rules",
    }
)


# Keys added to the configs after runs were recorded: absent from an older record, they
# count as these values (what those runs did), so the runs still resume.
ADDED_KEYS = {
    "data.tokenizer": "bytes",
    "data.add_bos": True,
    "data.add_eos": True,
    "data.join_directories": False,
    "init.hf_checkpoint": "",
    "init.rope_theta": 0.0,
    "model.param_dtype": "float32",
    "model.lact.grid": "document",
    "data.format": "text",
    "data.sources": [],
    "recipe.stages": [],
    "data.skip_bad_lines": False,
    "train.loss_average": "token",
    "model.lora.rank": 0,
    "model.lora.alpha": 16.0,
    "model.lora.targets": ["q", "k", "v", "o", "gate", "up", "down"],
    "evals.length.enabled": False,
    "evals.length.file": "",
    "evals.length.words": "50,100,200,400,800",
    "evals.length.samples": 4,
    "evals.length.temperature": 0.8,
    "evals.length.max_new_tokens": 0,
    "evals.length.slots": 0,
}


# Keys renamed when per-strategy, per-optimizer and LaCT settings were nested: an older
# record's flat key counts as each of these keys.
_LACT = ("fw_heads", "chunk_size", "window", "inter_multi", "momentum", "muon", "base_lr", "grid")
RENAMED_KEYS = {
    "data.num_packing_bins": ("data.first_fit.num_bins", "data.best_fit.num_bins"),
    **{f"data.dd_{k}": (f"data.dd.{k}",) for k in ("min_log2", "max_log2", "curriculum", "cycles")},
    "optimizer.b1": ("optimizer.adamw.b1", "optimizer.lamb.b1"),
    "optimizer.b2": ("optimizer.adamw.b2", "optimizer.lamb.b2"),
    "optimizer.eps": ("optimizer.adamw.eps", "optimizer.lamb.eps", "optimizer.adagrad.eps"),
    "optimizer.weight_decay": ("optimizer.adamw.weight_decay", "optimizer.lamb.weight_decay"),
    "optimizer.initial_accumulator_value": (
        "optimizer.adagrad.initial_accumulator_value",
        "optimizer.adagrad_norm.initial_accumulator_value",
    ),
    "schedule.power_a": ("schedule.power.a",),
    "schedule.power_b": ("schedule.power.b",),
    **{f"model.lact_{k}": (f"model.lact.{k}",) for k in _LACT},
}


def upgraded(recorded: dict) -> dict:
    """An older record with its renamed keys under their current names."""
    out = {}
    for key, value in recorded.items():
        for new in RENAMED_KEYS.get(key, (key,)):
            out[new] = value
    return out


def resumable(key: str) -> bool:
    """Whether a config key may differ on resume (generation, export, evaluation and
    serving settings never matter)."""
    return key in RESUMABLE or key.startswith(
        ("generate.", "export.", "evals.", "recipe.", "self_lengthen.", "serve.")
    )


def flatten(config) -> dict:
    """A config (or its Settings) as {dotted key: JSON value} (tuples become lists)."""
    return dotted(json.loads(json.dumps(as_dict(resolve(config)), default=_jsonable)))


def dotted(plain: dict) -> dict:
    """Nested dicts as {dotted key: leaf value}."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value

    walk("", plain)
    return out


def _jsonable(value):
    """JSON for what json cannot encode directly (placeholders, numpy scalars)."""
    if hasattr(value, "item"):
        return value.item()
    return None if value is None else repr(value)


def read_record(workdir: str) -> dict | None:
    """The flattened config a workdir's run started with, or None if it has none."""
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def recorded_config(workdir: str) -> dict:
    """The config a workdir's run was started with, as nested dicts: its record over
    configs/lm_tiny.py's values (for keys added since); for tools given only a workdir."""
    from lcx.config_loading import load_config
    from lcx.settings import ORIGIN

    record = read_record(workdir)
    if record is None:
        raise UserError(f"--workdir {workdir!r} has no {RECORD}: not a run's directory")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    plain = as_dict(resolve(load_config(os.path.join(root, ORIGIN))))
    known = flatten(plain)
    for key, value in upgraded(record).items():
        if key not in known:
            continue  # a key since removed
        *path, leaf = key.split(".")
        node = plain
        for name in path:
            node = node[name]
        node[leaf] = value
    return plain


def write_record(config, workdir: str) -> None:
    """Record the config of a run starting in `workdir` (process 0 writes)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, RECORD)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(flatten(config), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def differences(recorded: dict, config) -> dict:
    """{key: (recorded value, current value)} for every key that differs."""
    recorded, current = upgraded(recorded), flatten(config)
    keys = set(recorded) | set(current)
    missing = object()
    out = {}
    for key in sorted(keys):
        old, new = recorded.get(key, ADDED_KEYS.get(key, missing)), current.get(key, missing)
        if old != new:
            out[key] = (None if old is missing else old, None if new is missing else new)
    return out


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """How this invocation continues the workdir's run."""

    first_batch_size: int  # the schedule's step length in sequences
    micro_batch_size: int  # sequences per data-iterator batch
    changed: tuple[str, ...] = ()  # config keys that differ from the record


def _describe(diffs: dict, keys) -> str:
    """'a.b=1 (now 2), ...' for `keys`."""
    return ", ".join(f"{k}={diffs[k][0]!r} (now {diffs[k][1]!r})" for k in keys)


def plan_run(config, workdir: str, *, resuming: bool) -> RunPlan:
    """The RunPlan of a train invocation; ValueError (one line) if it cannot continue."""
    tc = config.train
    micro = tc.micro_batch_size or tc.batch_size
    recorded = read_record(workdir) if resuming else None
    if recorded is None:
        return RunPlan(first_batch_size=tc.batch_size, micro_batch_size=micro)
    diffs = differences(recorded, config)
    fixed = [k for k in diffs if not resumable(k)]
    if fixed and not tc.allow_config_change:
        raise UserError(
            f"--workdir {workdir} holds a run started with another config: "
            f"{_describe(diffs, fixed)}. Use a new --workdir, or pass "
            "--config.train.allow_config_change=True to continue it anyway"
        )
    first_micro = recorded["train.micro_batch_size"] or recorded["train.batch_size"]
    if "train.micro_batch_size" not in diffs:
        micro = first_micro  # the checkpointed data iterator draws batches of this size
    if tc.batch_size % micro:
        raise UserError(
            f"train.batch_size={tc.batch_size} cannot continue the run in {workdir}: it draws "
            f"micro-batches of {micro} sequences, so the batch size must be a multiple of "
            f"{micro} (or start a new --workdir)"
        )
    return RunPlan(
        first_batch_size=recorded["train.batch_size"],
        micro_batch_size=micro,
        changed=tuple(diffs),
    )


def check_model(config, workdir: str) -> None:
    """ValueError (one line) if the workdir's run was started with another model config."""
    recorded = read_record(workdir)
    if recorded is None:
        return
    diffs = differences(recorded, config)
    model = [k for k in diffs if k.startswith(("model.", "init.")) and k not in RESUMABLE]
    if model:
        raise UserError(
            f"--workdir {workdir} holds a model of another config: {_describe(diffs, model)}"
        )
