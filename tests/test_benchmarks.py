"""benchmarks/train_throughput.py at tiny size: structure and sanity, not speeds."""

import math

import pytest

from benchmarks import train_throughput as bench


def test_packed_vs_padded_throughput_tiny(text_corpus, capsys):
    # Documents of 1-300 tokens in 256-token rows: padding one per row wastes about
    # half of each row, so packing must show less padding and more targets per step.
    argv = ["--smoke", f"--paths={text_corpus}", "--seq_len=256", "--num_packing_bins=0,16"]
    argv += ["--steps=2", "--repeats=2", "--warmup=1", "--stat_batches=20"]
    result = bench.main(argv)

    results = result["results"]
    packed_labels = [label for label in results if label != bench.BASELINE]
    assert list(results)[0] == bench.BASELINE and len(packed_labels) == 2
    assert result["settings"]["seq_len"] == 256 and result["settings"]["repeats"] == 2
    padded = results[bench.BASELINE]
    for row in results.values():
        for key in (*bench.TIMED, "ratio"):
            spread = row[key]
            assert spread["min"] <= spread["median"] <= spread["max"], key
            assert all(math.isfinite(v) for v in spread.values()), key
        assert row["tokens_per_sec"]["min"] > 0 and row["step_ms"]["min"] > 0
        assert 0.0 <= row["padding_fraction"]["min"] and row["padding_fraction"]["max"] < 1.0
    assert padded["ratio"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert padded["token_ratio"] == 1.0 and padded["pipeline_padding"] > 0.3
    for label in packed_labels:
        assert results[label]["pipeline_padding"] < padded["pipeline_padding"]
        assert results[label]["token_ratio"] > 1.0
        assert results[label]["padding_fraction"]["median"] < padded["padding_fraction"]["median"]
        assert results[label]["ratio"]["median"] > 0

    printed = capsys.readouterr().out
    assert "python benchmarks/train_throughput.py --smoke" in printed
    assert printed.count("\n| ") == 1 + len(results)  # header and one row per variant


def test_run_needs_the_padded_baseline(smoke_config):
    with pytest.raises(ValueError, match="padded"):
        bench.run(smoke_config, {"first_fit": {"packing": "first_fit"}})
    with pytest.raises(ValueError, match="repeats=0"):
        bench.run(smoke_config, bench.variants(), repeats=0)


def test_short_document_corpus(tmp_path):
    count = bench.write_short_documents(str(tmp_path), mean=64, total_bytes=20_000)
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert len(sizes) == count and sum(sizes) >= 20_000 and min(sizes) >= 1
    assert 20 < sum(sizes) / count < 200  # exponential pieces of mean 64 (cut at file ends)
