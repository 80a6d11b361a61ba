"""benchmarks/hf_generate.py at smoke size: transformers and lcx generate the same tokens."""

import pytest


@pytest.mark.torch
def test_hf_generate_benchmark_matches_transformers_token_for_token(capsys):
    from benchmarks import hf_generate

    result = hf_generate.main(["--smoke", "--step_times"])
    row = result["64x2"]
    assert row["prompt_tokens"] < row["padded_tokens"]  # long-tailed: padding is waste
    for name in ("transformers", "lcx_generate", "lcx_prepacked", "lcx_paged"):
        assert row[name]["identical_sequences"] == 4, (name, row[name])
        seconds = row[name]["seconds"]
        assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
        assert row[name]["speedup"] > 0
    for name in ("lcx_prepacked", "lcx_paged"):
        steps = row["steps"][name]
        assert steps["prefill_seconds"]["min"] > 0
        assert 0 < steps["decode_step_ms"]["min"] <= steps["decode_step_ms"]["max"]
    out = capsys.readouterr().out
    assert "| 64x2 | lcx_paged |" in out and "decode step ms" in out
