"""Runs a researcher can trust: resume with config changes, signals, metrics, one's own data."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcx.config_loading import load_config
from lcx.settings import resolve
from lcx.train import loop
from lcx.train.input import load_split
from lcx.train.loop import Experiment, train_and_evaluate
from lcx.train.metrics import read_metrics
from lcx.train.preemption import Interrupted, StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "lm_tiny.py")


def _smoke(**train):
    config = load_config(SMOKE, "smoke")
    config.train.update(eval_every=0, **train)
    return config


def _final_params(config, workdir):
    """The parameters of the latest checkpoint in `workdir`, as numpy."""
    exp = Experiment(config, workdir, read_only=True)
    state = exp.restore_or_init()
    exp.checkpointer.close()
    return jax.tree.map(np.asarray, state.params)


def _train_lines(workdir):
    """The training records of metrics.jsonl as written (no de-duplication)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_resume_with_a_larger_batch_trains_the_larger_batch(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_smoke(steps=2), workdir)
    last = train_and_evaluate(_smoke(steps=4, batch_size=8), workdir)
    records = _train_lines(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one line per step
    assert [r["batch_size"] for r in records] == [4, 4, 8, 8]
    tokens = [r["tokens_seen"] for r in records]
    assert np.diff(tokens).tolist() == [4 * 64, 8 * 64, 8 * 64]
    for r in records[2:]:
        assert r["grad_norm"] > 0 and np.isfinite(r["loss"]) and r["loss"] > 0
        assert r["padding_fraction"] is not None  # strict JSON: never a bare NaN
    assert last["step"] == 4
    # The schedule keeps the first run's step lengths: the rate is a function of tokens,
    # so after 1,024 tokens it is what a run that never changed its batch has there.
    straight = str(tmp_path / "straight")
    train_and_evaluate(_smoke(steps=4), straight)
    want = {r["tokens_seen"]: r["learning_rate"] for r in read_metrics(straight)}
    assert records[2]["tokens_seen"] == 1024
    assert records[2]["learning_rate"] == pytest.approx(want[1024], rel=1e-6)


def test_resume_with_a_smaller_batch_is_refused_in_one_line(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_smoke(steps=2), workdir)
    with pytest.raises(ValueError, match="must be a multiple of 4") as info:
        train_and_evaluate(_smoke(steps=4, batch_size=2), workdir)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "key,value",
    [("data.packing", "best_fit"), ("optimizer.name", "lamb"), ("model.mlp_dim", 96)],
)
def test_resume_with_another_config_names_the_key(tmp_path, key, value):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_smoke(steps=2), workdir)
    config = _smoke(steps=4)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=f"another config: {key}=") as info:
        train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "\n" not in message and "new --workdir" in message and "allow_config_change" in message


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax reads left
def test_allowed_changes_continue_and_forced_ones_fail_in_one_line(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_smoke(steps=2), workdir)
    train_and_evaluate(_smoke(steps=3, log_every=2, progress=False), workdir)  # allowed
    config = _smoke(steps=4, allow_config_change=True)
    config.model.mlp_dim = 96  # forced, but the checkpoint cannot hold another width
    with pytest.raises(ValueError, match="does not fit this config's model") as info:
        train_and_evaluate(config, workdir)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax reads left
def test_stop_signal_checkpoints_the_step_reached(tmp_path, monkeypatch):
    # In-process: the run signals itself after step 3; it stops there with a checkpoint,
    # and resuming gives the same parameters as a run never interrupted.
    from lcx.train import runner as runner_lib

    calls = {"n": 0}
    original = runner_lib.StepRunner.__call__

    def step_then_signal(self, state, data_iter, step):
        out = original(self, state, data_iter, step)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(runner_lib.StepRunner, "__call__", step_then_signal)
    workdir = str(tmp_path / "run")
    with pytest.raises(Interrupted) as info:
        train_and_evaluate(_smoke(steps=8), workdir)
    assert info.value.step == 3 and info.value.exit_status == 128 + signal.SIGTERM
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    monkeypatch.setattr(runner_lib.StepRunner, "__call__", original)
    train_and_evaluate(_smoke(steps=8), workdir)
    straight = str(tmp_path / "straight")
    train_and_evaluate(_smoke(steps=8), straight)
    got, want = _final_params(_smoke(), workdir), _final_params(_smoke(), straight)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
    assert [r["step"] for r in _train_lines(workdir)] == list(range(1, 9))


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopSignals() as signals:
        signals._handle(signal.SIGINT, None)
        assert signals.requested(1) and not exits
        signals._handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def _run_cli(workdir, *extra, **popen):
    """`python -m lcx.main` on the smoke config, as a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "lcx.main", "--config", f"{SMOKE}:smoke", "--workdir", workdir,
         "--config.train.eval_every=0", *extra],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_from_outside_stops_with_a_checkpoint_and_one_line(tmp_path, signum):
    workdir = str(tmp_path / "run")
    proc = _run_cli(workdir, "--config.train.steps=400", "--config.train.checkpoint_every=1000")
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if "checkpoint of step" in x]
    step = int(line.split("checkpoint of step ")[1].split()[0])
    assert 3 <= step < 400 and "run the same command again to resume" in line
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
    resumed = _run_cli(workdir, "--config.train.steps=400")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resumed from step {step}" in stderr, stderr[-2000:]
    steps = [r["step"] for r in _train_lines(workdir)]
    assert len(steps) == len(set(steps)) and steps[-1] == 400


def test_two_paths_in_one_flag_and_a_one_file_corpus(tmp_path):
    one = tmp_path / "a"
    one.mkdir()
    (one / "book.txt").write_text("It was a dark and stormy night. " * 200)
    other = tmp_path / "b.txt"
    other.write_text("Call me Ishmael. " * 100)
    workdir = str(tmp_path / "run")
    proc = _run_cli(workdir, f"--config.data.paths={one},{other}", "--config.train.steps=2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "lcx: compiling the train step" in stderr and "lcx: trained to step 2" in stdout
    config = load_config(SMOKE, "smoke")
    config.data.paths = str(one / "book.txt")  # one file: an eval split by the tokens' tail
    data = resolve(config).data
    train, how = load_split(data, "train", None)
    held_out, how_eval = load_split(data, "eval", None)
    assert "last" in how and how == how_eval and held_out.num_tokens > 0
    assert train.num_tokens + held_out.num_tokens == 32 * 200 + 2


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax reads left
def test_eval_reads_a_read_only_workdir(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_smoke(steps=2), workdir)
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, f in os.walk(workdir)
              for p in f}  # fmt: skip
    monkeypatch.setattr(loop, "_writable", lambda path: False)  # root ignores chmod
    record = loop.evaluate_checkpoint(_smoke(), workdir)
    assert record["step"] == 2 and np.isfinite(record["eval_loss"])
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, f in os.walk(workdir)
             for p in f}  # fmt: skip
    assert after == before  # nothing written


def test_a_typo_on_a_loaded_config_raises():
    config = load_config(SMOKE, "smoke")
    config.train.steps = 8  # a real key: fine
    with pytest.raises(AttributeError):
        config.train.stepz = 8


def test_warmup_longer_than_the_run_is_reported(tmp_path):
    exp = Experiment(_smoke(steps=3), str(tmp_path))
    exp.checkpointer.close()
    assert any("warmup_steps" in w for w in exp.warnings) is False  # smoke: warmup 1 < 3
    config = _smoke(steps=3)
    config.schedule.warmup_steps = 5
    exp = Experiment(config, str(tmp_path))
    exp.checkpointer.close()
    assert any("schedule.warmup_steps=5 >= train.steps=3" in w for w in exp.warnings)


def test_import_lcx_gives_the_subpackages():
    code = "import lcx; print(lcx.attention.packed_attention.__name__, lcx.packing.STRATEGIES[0])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    assert result.returncode == 0 and result.stdout.split() == ["packed_attention", "first_fit"]


def test_make_train_workdir_follows_the_config():
    result = subprocess.run(
        ["make", "-n", "train", "CONFIG=configs/lm_tiny_dd.py", "STAMP="],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert "--config configs/lm_tiny_dd.py --workdir runs/lm_tiny_dd" in result.stdout


def test_config_values_are_checked_before_any_data_work(tmp_path):
    config = _smoke()
    config.data.packing = "zigzag"
    with pytest.raises(ValueError, match="data.packing='zigzag'"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "cache")  # nothing tokenized
