"""A training recipe's stages, in order, in one workdir (`--config.mode=recipe`).

`config.recipe.stages` lists them: each a name, overrides of the config (nested as the
config is: {"train": {"seq_len": 512}, "data": {...}}) and whether to run
`mode=evaluate` after it. Stage k trains in WORKDIR/<k>-<name> from the model the stage
before it ended with (exported as a Hugging Face directory, WORKDIR/<k>-<name>/hf, and
read back through `init.hf_checkpoint`, so every hand-over is the same files a user
would pass between runs; a stage whose overrides name an `init.hf_checkpoint` starts
from that instead). A finished stage writes WORKDIR/<k>-<name>/stage.json; run the same
command again after a crash or a kill and it skips the finished stages and resumes the
current one from its last checkpoint. ProLong's recipe (continued long-context
training, then SFT, then evaluation: Gao et al., arXiv 2410.02660) is
configs/prolong_tiny.py.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from lcx.errors import UserError
from lcx.evals.cli import evaluate_workdir
from lcx.settings import as_dict, merged, resolve
from lcx.train import train_and_evaluate
from lcx.train.restore import export_workdir

DONE = "stage.json"


def stage_directory(workdir: str, index: int, name: str) -> str:
    return os.path.join(workdir, f"{index}-{name}")


def run_recipe(config, workdir: str) -> dict:
    """Run (or resume) every stage of `config.recipe`; {"stages": [their records]}."""
    settings, workdir = resolve(config), os.path.abspath(workdir)
    if jax.process_count() > 1:
        raise UserError("mode=recipe runs in one process; run each stage's config on the hosts")
    stages = settings.recipe.stages
    if not stages:
        raise UserError(
            "recipe.stages is empty: mode=recipe needs stages (configs/prolong_tiny.py)"
        )
    base = as_dict(settings)
    base.update(mode="train", recipe={"stages": []})
    records, previous = [], None
    for index, stage in enumerate(stages):
        where = stage_directory(workdir, index, stage["name"])
        values = merged(base, stage["config"], f"recipe.stages[{index}].config")
        if previous and not stage["config"].get("init", {}).get("hf_checkpoint"):
            values["init"]["hf_checkpoint"] = previous
        stage_settings = resolve(values)
        done = os.path.join(where, DONE)
        if os.path.exists(done):
            with open(done) as f:
                record = json.load(f)
        else:
            record = _run_stage(stage, stage_settings, where)
        records.append(record)
        previous = record["hf"]
    return {"stages": records, "workdir": workdir}


def _run_stage(stage, settings, where: str) -> dict:
    """Run one stage (resuming): train and export its model, or Self-Lengthen's rounds
    (`mode=self_lengthen`: the stage's model is the last Generator, its evaluation the
    rounds' statistics); evaluate it if asked; its record."""
    os.makedirs(where, exist_ok=True)
    if settings.mode == "self_lengthen":
        from lcx.posttrain.self_lengthen import run_self_lengthen

        result = run_self_lengthen(settings, where)
        hf = result["generator"]
        # Its evaluation is the rounds' own: the last Generator's length statistics.
        record = {"name": stage["name"], "step": None, "hf": hf, "self_lengthen": result}
        return _finish(record | {"evals": [result["final"]]}, where)
    if settings.mode != "train":
        raise UserError(
            f"recipe stage {stage['name']!r}: mode={settings.mode!r}; valid: train, self_lengthen"
        )
    trained = train_and_evaluate(settings, where)
    hf = os.path.join(where, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        partial = hf + ".partial"  # a write cut off by a kill is redone, never trusted
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(hf, ignore_errors=True)
        export_workdir(settings, where, partial)
        os.replace(partial, hf)
    record = {
        "name": stage["name"],
        "step": trained.get("step"),
        "eval_loss": trained.get("eval_loss"),
        "hf": hf,
        "evals": _evaluate(settings, where) if stage["evaluate"] else [],
    }
    return _finish(record, where)


def _finish(record: dict, where: str) -> dict:
    """Write the stage's record: from now on the stage counts as done."""
    with open(os.path.join(where, DONE + ".tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(where, DONE + ".tmp"), os.path.join(where, DONE))
    return record


def _evaluate(settings, where: str) -> list[dict]:
    """mode=evaluate on the stage's workdir; the records it appended."""
    result = evaluate_workdir(settings, where)
    with open(result["results"]) as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines[len(lines) - result["records"] :]]
