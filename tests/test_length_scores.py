"""Length-following scores (lcx.evals.length) against the papers' formulas by hand."""

import numpy as np
import pytest

from lcx.evals.length import length_spread, longen_window, range_score, sl_score, word_count


def test_sl_score_is_longbench_writes_piecewise_line():
    assert sl_score(100, 100) == 100
    assert sl_score(100, 250) == pytest.approx(50)  # 1 - (2.5 - 1) / 3
    assert sl_score(100, 400) == 0 and sl_score(100, 900) == 0  # 4x and beyond
    assert sl_score(100, 50) == pytest.approx(50)  # 1 - (2 - 1) / 2
    assert sl_score(90, 30) == 0 and sl_score(100, 0) == 0  # x/3 and below
    longer = [sl_score(100, y) for y in range(100, 401, 20)]
    shorter = [sl_score(100, y) for y in range(100, 33, -7)]
    assert np.all(np.diff(longer) < 0) and np.all(np.diff(shorter) < 0)
    with pytest.raises(ValueError, match=r"^required=0: the required length must be positive"):
        sl_score(0, 10)
    with pytest.raises(ValueError, match=r"^produced=-1"):
        sl_score(10, -1)


def test_range_score_is_longens_window_score():
    lo, hi = longen_window(1000, "about")
    assert (lo, hi) == pytest.approx((800, 1200))
    assert longen_window(1000, "above") == pytest.approx((1000, 1500))
    assert longen_window(1000, "below") == pytest.approx((500, 1000))
    assert range_score(1000, lo, hi) == 1 and range_score(800, lo, hi) == 1
    assert range_score(600, lo, hi) == pytest.approx(0.5)  # 2 * 600 / 800 - 1
    assert range_score(300, lo, hi) == 0
    assert range_score(1500, lo, hi) == pytest.approx(0.5)  # 3 - 2 * 1500 / 1200
    assert range_score(1800, lo, hi) == 0
    with pytest.raises(ValueError, match=r"constraint='near'; valid: "):
        longen_window(10, "near")
    with pytest.raises(ValueError, match=r"0 < lo <= hi"):
        range_score(5, 10, 2)


def test_word_count_counts_cjk_characters_one_each():
    assert word_count("The model's output, in 3 parts.") == 6
    assert word_count("长文本生成") == 5
    assert word_count("Self-Lengthen 让输出更长") == 2 + 5
    assert word_count("") == 0 and word_count(" \n\t") == 0


def test_length_spread_per_prompt():
    spread = length_spread([100, 200, 300, 400, 1000])
    assert spread["mean"] == 400 and spread["n"] == 5
    assert spread["std"] == pytest.approx(np.std([100, 200, 300, 400, 1000]))
    assert spread["p90"] == pytest.approx(760)  # numpy's linear interpolation
    with pytest.raises(ValueError, match="lengths is empty"):
        length_spread([])
