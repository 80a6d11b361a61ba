"""benchmarks/sft.py at tiny size: structure and sanity, not speeds."""

import math

from benchmarks import sft as bench


def test_packed_sft_against_pretraining_tiny(capsys):
    argv = ["--smoke", "--seq_len=256", "--batch_size=4", "--conversations=120", "--median=80"]
    argv += ["--steps=1", "--repeats=1", "--warmup=1", "--stat_batches=8"]
    result = bench.main(argv)
    results = result["results"]
    assert list(results) == [bench.BASELINE, "sft"]
    assert results[bench.BASELINE]["ratio"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    for row in results.values():
        for key in ("tokens_per_sec", "step_ms", "ratio"):
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"]
            assert all(math.isfinite(v) and v > 0 for v in row[key].values())
        assert 0 <= row["pipeline_padding"] < 0.5
    assert 0.2 < result["settings"]["trained_share"] < 0.9
    printed = capsys.readouterr().out
    assert "python benchmarks/sft.py --smoke" in printed and printed.count("\n| ") == 3


def test_the_conversation_set_is_long_tailed_and_fits_the_rows():
    conversations = bench.conversation_set(2000, median=400, sigma=1.0, longest=2048)
    lengths = sorted(
        len(bench.ByteTokenizer().apply_chat_template(c["messages"])) for c in conversations
    )
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert 250 < median < 600 and p99 > 4 * median and lengths[-1] <= 2048 + 64
