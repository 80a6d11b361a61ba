"""benchmarks/dd.py at smoke size, so it never rots."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import dd  # noqa: E402


def test_dd_benchmark_runs(capsys):
    result = dd.main(["--smoke"])
    rows = result["results"]
    assert set(rows) == set(dd.STRATEGIES)
    assert rows["dd"]["tokens"] == rows["concat_chunk"]["tokens"]  # equal tokens
    assert rows["dd"]["attention_work"] < rows["concat_chunk"]["attention_work"]
    for r in rows.values():
        assert r["eval_loss"] > 0 and r["pipeline_vs_train"] > 0
    assert "| dd |" in capsys.readouterr().out
