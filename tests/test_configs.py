"""Every config under configs/ loads, with and without :smoke, and builds its model config."""

import glob
import importlib
import os

import pytest

from lcx.model import TransformerConfig
from lcx.train.sharding import MeshShape

CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_loads(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    assert config.mode in ("train", "eval", "recipe")
    if config.mode == "recipe":  # every stage's overrides name real keys and resolve
        from lcx.settings import as_dict, merged, resolve

        base = as_dict(resolve(config))
        for i, stage in enumerate(config.recipe.stages):
            resolve(merged(base, stage["config"], f"recipe.stages[{i}].config"))
    assert {"steps", "batch_size", "seq_len"} <= set(config.train)
    assert set(config.mesh) == {"data", "fsdp", "tensor", "sequence"}
    MeshShape(**config.mesh)
    TransformerConfig(**config.model)
    assert hasattr(config.data, "paths") and hasattr(config.data, "packing")


def test_smoke_is_smaller():
    from configs import lm_tiny

    full, smoke = lm_tiny.get_config(), lm_tiny.get_config("smoke")
    assert smoke.train.steps < full.train.steps
    assert smoke.model.d_model < full.model.d_model


def test_bad_config_argument():
    from configs import lm_tiny

    with pytest.raises(ValueError, match="smoke"):
        lm_tiny.get_config("nonsense")
