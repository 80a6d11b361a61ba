"""benchmarks/optimizers.py at smoke size, so it never rots."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import optimizers  # noqa: E402


def test_optimizer_benchmark_runs(tmp_path):
    plot = str(tmp_path / "batch.png")
    results = optimizers.run(tokens=4 * 4 * 64, smoke=True, repeats=2, plot=plot)
    assert set(results) == set(optimizers.VARIANTS)
    for r in results.values():
        assert r["tokens"] >= 4 * 4 * 64 and r["eval_loss"] > 0 and r["update_vs_adamw"] > 0
    sizes = [b for _, b in results["adamw+adadagrad"]["trajectory"]]
    assert sizes == sorted(sizes)
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| lamb+power |" in optimizers.markdown_table(results)
