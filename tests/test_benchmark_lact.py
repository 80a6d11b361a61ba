"""benchmarks/lact.py at smoke size, so it never rots; its blocked attention is exact."""

import os
import sys

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import lact  # noqa: E402
from lcx.attention import reference_attention  # noqa: E402


def test_blocked_flash_attention_matches_reference():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2100, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 2100, 1, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([1, 2, 0, 3], [700, 900, 10, 490])[None], jnp.int32)
    for causal, window in [(True, None), (True, 300), (False, None), (False, 300)]:
        kw = dict(causal=causal, window=window, scale=None)
        got = lact.blocked_flash_attention(q, k, v, seg, block_sizes=None, interpret=False, **kw)
        want = reference_attention(q, k, v, seg, **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_lact_benchmark_runs(capsys):
    result = lact.main(["--smoke"])
    assert result["lengths"] == [64, 128]
    for name in ("attention", "lact"):
        for mode in ("forward", "forward+backward"):
            for spread in result["results"][name][mode].values():
                assert 0 < spread["min"] <= spread["median"] <= spread["max"]
            assert np.isfinite(result["fits"][(name, mode)][0])
    assert "exponent p" in capsys.readouterr().out
    assert set(result["inner_gradient"]) == {"hand", "autodiff"}
    assert lact.crossover((2.0, 1.0), (1.0, 8.0)) == 8.0
    p, c = lact.fit_power_law([10, 100, 1000], [3e2, 3e4, 3e6])
    assert abs(p - 2) < 1e-9 and abs(c - 3) < 1e-6


def test_lact_comparison_runs_at_equal_parameters(capsys):
    from benchmarks import lact_compare

    result = lact_compare.main(["--smoke"])
    rows = result["results"]
    assert set(rows) == {"full", "swa", "lact"}
    params = [r["params"] for r in rows.values()]
    assert max(params) / min(params) < 1.05, params  # attention MLPs widened to match
    assert len({r["tokens"] for r in rows.values()}) == 1  # equal tokens
    for r in rows.values():
        assert np.isfinite(r["short"]["loss"]) and np.isfinite(r["long"]["loss_late"])
        assert r["num_short"] > 0 and r["num_long"] > 0
    assert "| lact |" in capsys.readouterr().out
