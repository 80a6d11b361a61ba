"""benchmarks/evals_compare.py at smoke size: pretrain, export, fine-tune, evaluate, report."""


def test_evals_comparison_runs(tmp_path, capsys):
    from benchmarks import evals_compare

    results = evals_compare.main(["--smoke", "--root", str(tmp_path)])
    assert [r["variant"] for r in results] == ["first_fit1k"]
    for r in results:
        assert sorted(r["kv"]) == [256, 512]
        assert 0.0 <= r["kv"][512]["exact_match"] <= 1.0
        assert r["loss_by_position"][0]["tokens"] > 0
    out = capsys.readouterr().out
    assert "kv EM 256" in out and "first_fit1k" in out
