"""The config resolved once into frozen dataclasses (lcx.settings)."""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os

import pytest

from lcx.config_loading import load_config
from lcx.errors import UserError
from lcx.settings import Settings, as_dict, resolve
from lcx.train import run_record
from lcx.train.optimizer import OptimizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py")
)


def _flat_to_dict(config) -> dict:
    """The record's flattening as it was before Settings: from ConfigDict.to_dict()."""
    return run_record.dotted(json.loads(json.dumps(config.to_dict(), default=run_record._jsonable)))


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_resolves_and_records_the_keys_it_recorded_before(path, arg):
    config = load_config(path, arg)
    settings = resolve(config)
    assert isinstance(settings, Settings) and resolve(settings) is settings
    # WORKDIR/config.json keeps its keys and values, so older runs still resume.
    assert run_record.flatten(settings) == _flat_to_dict(config)
    assert as_dict(settings)["model"]["block_pattern"] == list(config.model.block_pattern)


def test_settings_are_frozen_and_replaced_by_section(smoke_config):
    settings = resolve(smoke_config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.steps = 9
    with pytest.raises(TypeError):
        settings.data.by_name["first_fit"]["num_bins"] = 1  # read-only mappings
    longer = settings.replace(train={"steps": 9}, mode="eval")
    assert (longer.train.steps, longer.mode, longer.train.seq_len) == (9, "eval", 64)
    assert settings.train.steps == 4
    assert settings.data.packing_settings().num_bins == 128
    assert settings.data.packing_settings("ffd") is None  # takes no settings
    assert settings.data.packing_settings("dd").max_log2 == 8


def test_a_missing_or_unknown_key_is_one_line_naming_it(smoke_config):
    values = smoke_config.to_dict()
    del values["train"]["steps"]
    with pytest.raises(UserError, match=r"^config.train: missing key\(s\) \['steps'\]; a config "):
        resolve(values)
    values = smoke_config.to_dict()
    values["data"]["dd"] = 3
    with pytest.raises(UserError, match=r"^config.data.dd=3: expected a dict of dd's settings"):
        resolve(values)
    values = smoke_config.to_dict()
    values["model"]["lact"]["chunk"] = 64
    with pytest.raises(UserError, match=r"^config.model.lact: unknown key\(s\) \['chunk'\]"):
        resolve(values)
    values = smoke_config.to_dict()
    values["optimizer"]["adamw_v2"] = {"b1": 0.9}  # checked by lcx.train.optimizer
    with pytest.raises(
        UserError, match=r"^optimizer.adamw_v2: unknown optimizer 'adamw_v2'; valid: "
    ):
        OptimizerConfig.of(resolve(values).optimizer)
    values["optimizer"]["adamw_v2"] = 0.9
    with pytest.raises(UserError, match=r"^config.optimizer: unknown key\(s\) \['adamw_v2'\]"):
        resolve(values)
    values = smoke_config.to_dict()
    values["evals"] = "all"
    with pytest.raises(UserError, match=r"^config.evals='all': expected a section of keys"):
        resolve(values)


CONFIG_NAMES = {"config", "c", "cfg", "data_cfg", "ec", "gc", "tc", "init", "settings"}


def _receiver(node) -> str:
    """The first name of `a.b.c` (the object a `.get` is called on)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_no_module_reads_the_config_through_get_with_a_default():
    """The settings are attributes: no `config.<section>.get(key, default)` in lcx."""
    found = []
    for path in glob.glob(os.path.join(ROOT, "lcx", "**", "*.py"), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and _receiver(node.func.value) in CONFIG_NAMES
            ):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not found, f"config read through .get(): {found}"
