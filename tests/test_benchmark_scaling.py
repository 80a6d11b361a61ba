"""benchmarks/scaling.py at tiny size: both parallelisms run in their own processes."""

from benchmarks import scaling as bench


def test_scaling_benchmark_runs_data_and_sequence_parallel(capsys):
    results = bench.main(["--smoke", "--devices", "2"])
    assert set(results) == {("data", 2), ("sequence", 2)}
    for r in results.values():
        assert 0 < r["min"] <= r["step_s"] <= r["max"] and r["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "python benchmarks/scaling.py --smoke --devices 2" in printed
    assert printed.count("\n| sequence | 2 |") == 1


def test_compile_depth_benchmark_runs(capsys):
    from benchmarks import compile_depth

    results = compile_depth.main(["--smoke"])
    assert set(results) == {(n, s) for n in (2, 4) for s in (False, True)}
    assert all(v > 0 for v in results.values())
    assert capsys.readouterr().out.count("\n| 4 |") == 1
