"""`mode=recipe` on configs/prolong_tiny.py:smoke (issue 28 item 5): pretraining, continued
long training on a 60/40 mix, SFT on conversations, evaluation after each stage, in one
workdir; a run killed in a stage resumes at that stage."""

import json
import os

import pytest

from lcx.config_loading import load_config
from lcx.errors import UserError
from lcx.modes import recipe as recipe_mode
from lcx.posttrain import recipe
from lcx.settings import merged, resolve
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def prolong_smoke():
    return resolve(load_config(os.path.join(ROOT, "configs", "prolong_tiny.py"), "smoke"))


def test_prolong_recipe_runs_every_stage_and_resumes_at_the_one_it_was_in(tmp_path, monkeypatch):
    settings, workdir = prolong_smoke(), str(tmp_path)
    real, trained = recipe.train_and_evaluate, []

    def killed_in_sft(stage_settings, where):
        trained.append(os.path.basename(where))
        if where.endswith("2-sft"):
            raise KeyboardInterrupt  # as if killed before the stage's first step
        return real(stage_settings, where)

    monkeypatch.setattr(recipe, "train_and_evaluate", killed_in_sft)
    with pytest.raises(KeyboardInterrupt):
        recipe.run_recipe(settings, workdir)
    assert trained == ["0-pretrain", "1-long", "2-sft"]
    done = {k: os.path.getmtime(tmp_path / k / "stage.json") for k in ("0-pretrain", "1-long")}

    monkeypatch.setattr(
        recipe, "train_and_evaluate", lambda s, w: (trained.append(w), real(s, w))[1]
    )
    result = recipe.run_recipe(settings, workdir)
    assert trained[3:] == [os.path.join(workdir, "2-sft")]  # only the stage it was in
    assert done == {k: os.path.getmtime(tmp_path / k / "stage.json") for k in done}

    stages = {r["name"]: r for r in result["stages"]}
    assert list(stages) == ["pretrain", "long", "sft"]
    for record in stages.values():
        assert record["step"] == 2 and os.path.isfile(os.path.join(record["hf"], "config.json"))
        assert [e["task"] for e in record["evals"]] == ["kv_retrieval"]
    # Each stage starts from the one before; the long stage raised the RoPE base 4x.
    with open(tmp_path / "1-long" / "config.json") as f:
        long_config = json.load(f)
    assert long_config["init.hf_checkpoint"] == stages["pretrain"]["hf"]
    with open(os.path.join(stages["long"]["hf"], "config.json")) as f:
        assert json.load(f)["rope_theta"] == 4 * settings.model.rope_theta
    with open(tmp_path / "2-sft" / "config.json") as f:
        sft_config = json.load(f)
    assert sft_config["data.format"] == "chat" and sft_config["train.loss_average"] == "token"
    summary = recipe_mode.summary(result, workdir)
    assert "pretrain (step 2" in summary and "sft (step 2" in summary


def test_overrides_name_real_keys():
    base = {"train": {"steps": 1, "seq_len": 8}, "mode": "train"}
    assert merged(base, {"train": {"steps": 5}}) == {
        "train": {"steps": 5, "seq_len": 8},
        "mode": "train",
    }
    with pytest.raises(
        UserError, match=r"recipe.stages\[0\].config.train.stepz: the config has no"
    ):
        merged(base, {"train": {"stepz": 5}}, "recipe.stages[0].config")


def test_recipe_settings_are_checked():
    config = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), "smoke")
    config.recipe.stages = ({"name": "a", "config": {}},)
    with pytest.raises(UserError, match=r"recipe.stages\[0\]: needs exactly the keys"):
        resolve(config)
    config.recipe.stages = (
        {"name": "a", "config": {}, "evaluate": False},
        {"name": "a", "config": {}, "evaluate": False},
    )
    with pytest.raises(UserError, match="must differ"):
        resolve(config)
    config.recipe.stages = ()
    with pytest.raises(UserError, match="recipe.stages is empty"):
        recipe.run_recipe(resolve(config), "/nonexistent")
