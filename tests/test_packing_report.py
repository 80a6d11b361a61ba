"""Packing statistics and the report command on a small corpus."""

import numpy as np

from lcx.packing import report as report_cli
from lcx.packing.stats import attention_work, measure, run_lengths
from tests.packing_options import options
from tests.test_packing_strategies import _unique_corpus


def test_attention_work_is_sum_of_squares_over_t_squared():
    seg = np.asarray([[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(attention_work(seg), [1.0, 0.5, 2 / 16, 0.0])
    np.testing.assert_array_equal(run_lengths([0, 3, 3, 0, 5]), [2, 1])


def test_measure_accounts_for_every_token():
    corpus = _unique_corpus(np.random.default_rng(0).integers(1, 300, 80))
    for packing in ("first_fit", "padded", "concat_chunk", "ffd", "dd"):
        opts = options(packing, seq_len=128, batch_size=4, dd={"min_log2": 4, "max_log2": 7})
        s = measure(corpus, opts)
        assert s.tokens + s.tokens_dropped >= corpus.num_tokens  # a whole epoch
        assert 0 <= s.padding_fraction < 1 and 0 < s.attention_work_per_token <= 1
        if packing == "dd":
            assert s.padding_fraction == 0 and s.tokens_dropped > 0
        else:
            assert s.tokens == corpus.num_tokens and s.tokens_dropped == 0
        assert s.tokens_per_sec > 0


def test_report_command_on_a_config(tmp_path, capsys):
    png = str(tmp_path / "report.png")
    argv = ["--config", "configs/lm_tiny.py:smoke", "--row_lens", "256,1024"]
    results = report_cli.main([*argv, "--max_tokens", "60000", "--png", png])
    out = capsys.readouterr().out
    for packing in ("first_fit", "best_fit", "concat_chunk", "ffd", "padded", "dd"):
        assert f"| {packing} | 256 |" in out and f"| {packing} | 1024 |" in out
    by = {(s.packing, s.row_len): s for s in results}
    assert by[("padded", 1024)].padding_fraction > by[("ffd", 1024)].padding_fraction
    work = {k: s.attention_work_per_token for k, s in by.items()}
    assert work[("dd", 1024)] < work[("concat_chunk", 1024)]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report_cli.main(["--strategies", "zigzag", "--max_tokens", "10"]) == 2
    assert "--strategies" in capsys.readouterr().err
