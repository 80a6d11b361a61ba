"""benchmarks/lact.py and lact_compare.py at smoke size, so they never rot."""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import lact  # noqa: E402


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
