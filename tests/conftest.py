"""Shared fixtures: a seeded random generator, a tiny corpus on disk and the smoke config."""

from __future__ import annotations

import fnmatch
import os
import secrets
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so `configs` imports like it does for the command line


SEED_VARIABLE = "LCX_TEST_SEED"

# JAX's persistent compilation cache, shared by every test of a run, the xdist workers and
# the subprocesses the tests start (they inherit the environment): the smoke models'
# programs compile once per run instead of once per test. Entries are keyed by the program,
# the backend and JAX's version; a size limit turns on the cache's file lock, so workers
# share the directory safely. Set before anything imports jax; the environment overrides.
_COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".pytest_cache", "jax"),
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
for _name, _value in _COMPILATION_CACHE.items():
    os.environ.setdefault(_name, _value)

# The tests' programs are tiny: compiling them costs far more than running them. XLA's CPU
# backend at optimisation level 0 skips LLVM's optimisation passes (the HLO, its fusions
# and buffer assignment are the same, fast-math stays off), which cuts compile time by a
# quarter (BENCHMARKS.md, "Test suite durations"). Subprocesses inherit it; benchmark
# figures come from the scripts run outside the tests, at XLA's default level. A test that
# sets XLA_FLAGS for a subprocess (the device count) replaces it; LCX_TEST_XLA_OPT=1 keeps
# the default level everywhere.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if os.environ.get("LCX_TEST_XLA_OPT") != "1" and "optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()


# Tests that run a whole job (a training run, the command line, the serving engine, a
# benchmark script at smoke size) carry the `integration` marker: `make test-fast` leaves
# them out, `make test` runs them. These files hold only such tests; elsewhere a test is
# marked where it is defined.
INTEGRATION_FILES = (
    "test_benchmark*.py",
    "test_checkpoints.py",
    "test_continue_long.py",
    "test_distributed.py",
    "test_evals.py",
    "test_generate.py",
    "test_main.py",
    "test_memory.py",
    "test_packing_registry.py",
    "test_runs.py",
    "test_tokenizers.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(fnmatch.fnmatch(item.path.name, pattern) for pattern in INTEGRATION_FILES):
            item.add_marker(pytest.mark.integration)
    # Longest first: whole jobs and notebooks lead (stable within each group), so xdist's
    # two workers end on short unit tests rather than one idling through the other's
    # last notebook or documented command.
    heavy = ("integration", "notebook")
    items.sort(key=lambda item: not any(m.name in heavy for m in item.iter_markers()))


@pytest.fixture
def rng(request):
    """A numpy Generator with a fresh seed, or $LCX_TEST_SEED; a failure prints the seed."""
    seed = int(os.environ.get(SEED_VARIABLE) or secrets.randbits(32))
    request.node.lcx_seed = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Add the random seed to a failed test's report, with the command to replay it."""
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "lcx_seed", None)
    if report.failed and seed is not None:
        replay = f"{SEED_VARIABLE}={seed} python -m pytest '{item.nodeid}'"
        report.sections.append(("random seed", f"seed {seed}; replay: {replay}"))


@pytest.fixture
def loop_runs(monkeypatch):
    """A list that gains an entry each time a `jax.lax.fori_loop` body traced from now
    on runs (call `jax.effects_barrier()` before reading it): counts, not timings, prove
    that a loop skips work."""
    import jax

    runs = []
    fori_loop = jax.lax.fori_loop

    def counted(lower, upper, body, carry):
        """fori_loop, counting each run of the body."""

        def body_counted(i, carry):
            jax.debug.callback(lambda: runs.append(1))
            return body(i, carry)

        return fori_loop(lower, upper, body_counted, carry)

    monkeypatch.setattr(jax.lax, "fori_loop", counted)
    return runs


@pytest.fixture
def smoke_config():
    from configs import lm_tiny

    return lm_tiny.get_config("smoke")


@pytest.fixture
def text_corpus(tmp_path):
    """A directory of random-length documents: some longer than a 64-token row."""
    rng = np.random.default_rng(1234)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        n = int(rng.integers(1, 300))
        data = bytes(rng.integers(32, 127, size=n, dtype=np.uint8))
        (root / f"doc{i:03d}.txt").write_bytes(data)
    return str(root)


def tiny_byte_model(seed: int = 0):
    """A random float32 Transformer over the byte tokenizer's 384 ids: the server's and
    the harness's tests run it."""
    from flax import nnx

    from lcx.model import Transformer, TransformerConfig

    cfg = TransformerConfig(
        vocab_size=384,
        d_model=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        mlp_dim=64,
        attention_implementation="xla_chunked",
    )
    return Transformer(cfg, rngs=nnx.Rngs(seed))
