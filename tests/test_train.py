"""End-to-end training on the smoke config: checkpoints, metrics, exact resume, eval."""

import json
import os

import jax
import numpy as np
import pytest

from lcx.config_loading import load_config
from lcx.train import evaluate_checkpoint, train_and_evaluate
from lcx.train.loop import Experiment
from lcx.train.metrics import read_metrics

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _smoke(name):
    return load_config(os.path.join(CONFIGS, f"{name}.py"), "smoke")


def _final_params(config, workdir):
    return jax.device_get(Experiment(config, workdir).restore_or_init().params)


def _iterator_state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
    with open(path) as f:
        return json.load(f)


def test_smoke_run_writes_checkpoints_and_metrics(smoke_config, tmp_path):
    workdir = str(tmp_path / "run")
    last = train_and_evaluate(smoke_config, workdir)
    records = read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, smoke_config.train.steps + 1))
    for r in train_records:
        assert {"step", "loss", "tokens_per_sec", "padding_fraction"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
        assert 0.0 <= r["padding_fraction"] < 1.0
    assert any("eval_loss" in r for r in records)
    assert last["step"] == smoke_config.train.steps
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps[-1] == smoke_config.train.steps
    assert os.listdir(os.path.join(workdir, "cache"))  # the zarr token cache
    with open(os.path.join(workdir, "loss.png"), "rb") as f:  # the loss curve
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # eval mode reads the latest checkpoint
    record = evaluate_checkpoint(smoke_config, workdir)
    assert record["step"] == smoke_config.train.steps and np.isfinite(record["eval_loss"])


@pytest.mark.parametrize("name", ["lm_tiny", "lm_tiny_adaptive", "lm_tiny_dd"])
def test_restart_reproduces_an_uninterrupted_run(name, tmp_path):
    smoke_config = _smoke(name)
    smoke_config.optimizer.name = "lamb" if name == "lm_tiny_adaptive" else "adamw"
    smoke_config.batch.max_batch_size = 8
    smoke_config.train.steps = 6
    smoke_config.train.checkpoint_every = 3
    smoke_config.train.eval_every = 0
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(smoke_config, straight)
    train_and_evaluate(smoke_config, resumed, stop_after=3)
    assert max(r["step"] for r in read_metrics(resumed)) == 3
    train_and_evaluate(smoke_config, resumed)

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

    assert losses(straight) == losses(resumed)
    sizes = {r["step"]: r["batch_size"] for r in read_metrics(resumed) if "loss" in r}
    if name == "lm_tiny_adaptive":
        assert sizes[6] > sizes[1], "the adaptive run should have grown its batch"
    assert _iterator_state(straight, 6) == _iterator_state(resumed, 6)
    a, b = _final_params(smoke_config, straight), _final_params(smoke_config, resumed)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
    "name", ["lm_tiny_lamb", "lm_tiny_adaptive", "lm_lact_tiny", "lm_tiny_dd", "lm_1b_tpu"]
)
def test_variant_configs_train(name, tmp_path):
    config = _smoke(name)
    last = train_and_evaluate(config, str(tmp_path / name))
    records = [r for r in read_metrics(str(tmp_path / name)) if "loss" in r]
    assert {"learning_rate", "tokens_seen", "batch_size"} <= set(records[-1])
    assert np.isfinite(last["loss"]) and max(r["learning_rate"] for r in records) > 0
    tokens = [r["tokens_seen"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_dataset_decomposition_compiles_once_per_bucket_shape(tmp_path):
    config = _smoke("lm_tiny_dd")
    config.train.update(steps=12, eval_every=0)
    train_and_evaluate(config, str(tmp_path / "dd"))
    records = [r for r in read_metrics(str(tmp_path / "dd")) if "loss" in r]
    tokens_per_step = config.train.batch_size * config.train.seq_len
    seen = set()
    for i, r in enumerate(records, start=1):
        seen.add(r["row_len"])
        assert r["compiles"] == len(seen)  # a new shape compiles once, then is cached
        assert r["tokens_seen"] == i * tokens_per_step  # the schedule's clock: tokens
    assert len(seen) > 1 and seen <= {16, 32, 64}


def test_chunkflow_training_runs_dependent_chunks(tmp_path):
    config = _smoke("lm_tiny")
    config.data.packing = "chunkflow"
    config.train.update(steps=3, eval_every=3)
    config.model.attention_window = 8  # windows reach into the earlier chunks' keys
    last = train_and_evaluate(config, str(tmp_path / "cf"))
    assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])
    config.model.block_pattern = ("lact",)
    with pytest.raises(ValueError, match="chunkflow"):
        train_and_evaluate(config, str(tmp_path / "cf_lact"))


def test_max_tokens_stops_early(smoke_config, tmp_path):
    smoke_config.train.max_tokens = 3 * smoke_config.train.batch_size * smoke_config.train.seq_len
    last = train_and_evaluate(smoke_config, str(tmp_path / "run"))
    assert last["step"] == 3 and last["tokens_seen"] == smoke_config.train.max_tokens


def test_tokens_per_sec_waits_for_the_step(tmp_path, monkeypatch):
    # A step whose results take 0.2 s to arrive: the rate must count that wait, not only
    # the (asynchronous, instant) dispatch.
    import time

    from lcx.train import metrics as metrics_lib

    def slow_device_get(x):
        time.sleep(0.2)
        return x

    monkeypatch.setattr(metrics_lib.jax, "device_get", slow_device_get)
    window = metrics_lib.MetricsWindow(
        metrics_lib.MetricsWriter(str(tmp_path)), metrics_lib.Progress(2, 0, enabled=False)
    )
    stats = {"real_tokens": 1000, "target_tokens": 1000, "padding_fraction": 0.0}
    metrics = {"loss": 1.0, "batch_size": 4}
    window.add(1, metrics, stats, log=True)
    window.add(2, metrics, stats, log=True)  # logs step 1
    assert window.last["step"] == 1
    assert window.last["tokens_per_sec"] <= 1000 / 0.2
