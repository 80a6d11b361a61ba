"""Multi-process runs on one machine: two processes train like one, faults, resharding.

Every run here is a subprocess (`python -m lcx.main`), with its own host devices.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "lm_tiny.py")
COMMON = [
    "--config", f"{SMOKE}:smoke", "--config.train.eval_every=0", "--config.model.dtype=float32",
    "--config.train.batch_size=8", "--config.mesh.data=-1",
]  # fmt: skip


def _env(devices):
    return dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )  # fmt: skip


def _one_process(workdir, devices, *extra, timeout=600):
    """`python -m lcx.main` with `devices` host devices; the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "lcx.main", *COMMON, "--workdir", str(workdir), *extra],
        cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _processes(workdir, *extra, timeout=600):
    """Two processes of four devices through scripts/local_processes.py."""
    return subprocess.run(
        [sys.executable, "scripts/local_processes.py", "--processes", "2",
         "--devices_per_process", "4", "--", *COMMON, "--workdir", str(workdir), *extra],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _losses(workdir):
    """{step: loss} of metrics.jsonl (the last line of a step wins)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: (r["loss"], r["tokens_seen"]) for r in records if "loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    two = _processes(tmp_path / "two", "--config.train.steps=3")
    assert two.returncode == 0, two.stderr[-3000:]
    # One process reading the same two data shards (data.shards=2) on 8 devices.
    one = _one_process(tmp_path / "one", 8, "--config.train.steps=3", "--config.data.shards=2")
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(got) == [1, 2, 3]
    for step in got:
        np.testing.assert_allclose(got[step][0], want[step][0], rtol=1e-5)
        assert got[step][1] == want[step][1]
    assert two.stdout.count("lcx: trained to step 3") == 1  # process 0 speaks


def _two_processes(workdir, *extra):
    """Two `python -m lcx.main` processes of four devices joined by jax.distributed."""
    port = _free_port()
    args = [*COMMON, "--workdir", str(workdir), *extra, "--num_processes=2",
            f"--coordinator_address=localhost:{port}", "--distributed_timeout=60"]  # fmt: skip
    return [
        subprocess.Popen(
            [sys.executable, "-m", "lcx.main", *args, f"--process_id={i}"],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _wait_for_steps(workdir, procs, steps, timeout=300):
    """Return once metrics.jsonl logs `steps` steps, both processes still running."""
    metrics, deadline = workdir / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and len(_losses(workdir)) >= steps):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        assert time.time() < deadline, f"no {steps} steps within {timeout} s"
        time.sleep(0.05)


# Twelve steps of a 200-step schedule (12 * 8 * 64 tokens), a checkpoint every other.
TWELVE = ["--config.train.steps=200", "--config.train.max_tokens=6144",
          "--config.train.checkpoint_every=2"]  # fmt: skip


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """The workdir of an unbroken two-process run of TWELVE, which the broken ones resume
    to (one run for every test here)."""
    workdir = tmp_path_factory.mktemp("unbroken")
    run = _processes(workdir, *TWELVE, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_both_resume_losing_no_tokens(tmp_path, unbroken):
    workdir = tmp_path / "run"
    procs = _two_processes(workdir, "--config.train.steps=200", "--config.train.checkpoint_every=2")
    try:
        _wait_for_steps(workdir, procs, 5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        procs[0].wait(timeout=BOUND_S)  # raises TimeoutExpired: a hang
        assert procs[0].returncode != 0
        print(f"the survivor exited {time.time() - killed:.1f} s after the kill")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    resumed = _processes(workdir, *TWELVE, timeout=300)  # both continue the schedule
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    got, want = _losses(workdir), _losses(unbroken)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:  # the same batches: same tokens counted, same losses
        assert got[step][1] == want[step][1]
        np.testing.assert_allclose(got[step][0], want[step][0], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_a_killed_launcher_leaves_no_process_running(tmp_path):
    """scripts/local_processes.py SIGKILLed, as a timeout does: both runs go with it."""
    launcher = subprocess.Popen(
        [sys.executable, "scripts/local_processes.py", "--", *COMMON,
         "--workdir", str(tmp_path / "run"), "--config.train.steps=1000"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    children = []
    try:
        deadline = time.time() + 60
        while len(children) < 2:
            assert launcher.poll() is None and time.time() < deadline, children
            with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
            time.sleep(0.05)
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.time() + 10
        while any(map(_running, children)):
            assert time.time() < deadline, [pid for pid in children if _running(pid)]
            time.sleep(0.05)
    finally:
        for pid in filter(_running, [launcher.pid, *children]):
            os.kill(pid, signal.SIGKILL)


def _running(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_is_exact(tmp_path, unbroken):
    """Both save the step reached and exit 143; resumed, the run equals an unbroken one."""
    started = time.time()
    workdir = tmp_path / "run"
    procs = _two_processes(workdir, *TWELVE)
    try:
        _wait_for_steps(workdir, procs, 2)
        procs[1].send_signal(signal.SIGTERM)  # one process only, as a scheduler might
        stderrs = [p.communicate(timeout=BOUND_S)[1] for p in procs]  # TimeoutExpired: a hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [128 + 15] * 2, stderrs[0][-3000:] + stderrs[1][-3000:]
    steps = [int(e.split("stopped by SIGTERM at step ")[1].split(";")[0]) for e in stderrs]
    assert steps[0] == steps[1] < 12, steps
    saved = [int(x) for x in os.listdir(workdir / "checkpoints") if x.isdigit()]
    assert max(saved) == steps[0], saved
    resumed = _processes(workdir, *TWELVE, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {steps[0]}" in resumed.stderr
    assert "never awaited" not in resumed.stderr and "loop is closed" not in resumed.stderr
    got, want = _losses(workdir), _losses(unbroken)
    assert got == want and sorted(want) == list(range(1, 13))  # bit for bit, every step
    got_params, want_params = _final_params(workdir), _final_params(unbroken)
    assert got_params.keys() == want_params.keys()
    for name, value in want_params.items():
        np.testing.assert_array_equal(got_params[name], value, err_msg=name)
    print(f"stopped at step {steps[0]}; the test took {time.time() - started:.0f} s")


def _final_params(workdir):
    """{path: array} of the parameters in the newest checkpoint, read as numpy."""
    import jax
    import orbax.checkpoint as ocp

    steps = sorted(int(x) for x in os.listdir(workdir / "checkpoints") if x.isdigit())
    path = workdir / "checkpoints" / str(steps[-1]) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(path, restore_args=restore_args)
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


# The survivor learns of a dead peer through JAX's heartbeats (lcx.train.distributed's
# heartbeat_s=20) and exits; allow for detection and teardown.
BOUND_S = 90


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_checkpoint_written_on_one_mesh_continues_on_another(tmp_path):
    """fsdp=8 on 8 devices, then data=2, tensor=2 on 4: the losses of an unresharded run."""
    first = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.steps=4"]
    run = _one_process(tmp_path / "run", 8, *first, "--config.train.max_tokens=1024")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(_losses(tmp_path / "run")) == [1, 2]
    second = ["--config.mesh.data=2", "--config.mesh.tensor=2", "--config.train.steps=4"]
    resumed = _one_process(tmp_path / "run", 4, *second)
    assert resumed.returncode == 0 and "resumed from step 2" in resumed.stderr, resumed.stderr
    straight = _one_process(tmp_path / "straight", 8, *first)
    assert straight.returncode == 0, straight.stderr[-3000:]
    got, want = _losses(tmp_path / "run"), _losses(tmp_path / "straight")
    for step in (3, 4):
        np.testing.assert_allclose(got[step][0], want[step][0], rtol=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_processes=2"], "go together"),
        (
            [
                "--coordinator_address=localhost:1",
                "--num_processes=2",
                "--process_id=1",
                "--distributed_timeout=5",
            ],
            "could not join the coordinator",
        ),  # fmt: skip
        (["--config.mesh.fsdp=3"], "does not divide"),
        (["--config.mesh.sequence=2", "--config.train.seq_len=62"], "multiple of 2 * mesh"),
    ],
    ids=["process_id missing", "unreachable coordinator", "mesh", "sequence"],
)
def test_bad_distributed_input_is_one_line(tmp_path, extra, message):
    start = time.time()
    result = _one_process(tmp_path / "run", 4, "--config.train.steps=1", *extra, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("lcx: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert time.time() - start < 60


@pytest.mark.slow
def test_a_checkpoint_cut_off_mid_write_is_set_aside_for_the_previous_one(tmp_path, monkeypatch):
    from lcx.config_loading import load_config
    from lcx.train.loop import Experiment, train_and_evaluate

    config = load_config(SMOKE, "smoke")
    config.train.update(eval_every=0, checkpoint_every=2, steps=4)
    workdir = tmp_path / "run"
    train_and_evaluate(config, str(workdir))
    # A write of step 4 cut off: its array files and commit markers never landed.
    cut = workdir / "checkpoints" / "4"
    for name in ("state/d", "state/ocdbt.process_0"):
        shutil.rmtree(cut / name)
    (cut / "commit_success.txt").unlink()
    config.train.steps = 6
    # Restores that fail leave no orbax reads behind: no coroutine left unawaited, no
    # callback into a closed event loop (both reach sys.unraisablehook or warnings).
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = Experiment(config, str(workdir))
        try:
            state = exp.restore_or_init()
            assert int(state.step) == 2 and exp.resume_step == 2
            (warning,) = exp.warnings
            assert "step 4 is incomplete" in warning and "resuming from step 2" in warning
            assert (workdir / "checkpoints" / "4.incomplete").is_dir() and not cut.exists()
        finally:
            exp.checkpointer.close()
        # A wider model: every restore fails on the first array, before any read starts.
        wider = load_config(SMOKE, "smoke")
        wider.model.mlp_dim = 96
        wider.train.allow_config_change = True
        exp = Experiment(wider, str(workdir))
        try:
            with pytest.raises(ValueError, match="does not fit this config's model"):
                exp.restore_or_init()
        finally:
            exp.checkpointer.close()
        gc.collect()  # an abandoned coroutine warns when it is collected
    left = [str(u.exc_value) for u in unraisable]
    left += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not left, left[:3]
    assert train_and_evaluate(config, str(workdir))["step"] == 6
