"""benchmarks/serve.py at tiny size: both sides run the same trace to the same tokens,
the server without errors, and the table prints."""

import pytest

from benchmarks import serve as bench


@pytest.mark.integration
def test_serve_benchmark_runs(capsys):
    result = bench.main(["--smoke", "--repeats=1"])
    engine, server = result["engine"], result["server"]
    assert server["errors"] == 0 and engine["errors"] == 0
    assert server["tokens"] == engine["tokens"] > 0  # greedy: the same tokens either way
    for side in (engine, server):
        assert side["requests_per_sec"] > 0 and side["tokens_per_sec"] > 0
        assert 0 < side["ttft_p50_ms"] <= side["ttft_p99_ms"]
        assert 0 <= side["itl_p50_ms"] <= side["itl_p99_ms"]
    printed = capsys.readouterr().out
    assert "python benchmarks/serve.py --smoke --repeats=1" in printed and "| server |" in printed
