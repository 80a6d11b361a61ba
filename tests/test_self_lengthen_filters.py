"""Self-Lengthen's text operations and filters (lcx.posttrain.self_lengthen)."""

import pytest

from lcx.posttrain.self_lengthen import (
    check_extension,
    ends_a_sentence,
    first_half,
    leading_fraction,
    paragraphs,
    repeats_ngram,
)

TEXT = "First point.\n\nSecond point, longer.\n \nThird.\n\n\nFourth and last."


def test_halves_and_fractions_split_on_paragraphs_then_sentences():
    assert paragraphs(TEXT) == [
        "First point.",
        "Second point, longer.",
        "Third.",
        "Fourth and last.",
    ]
    assert first_half(TEXT) == "First point.\n\nSecond point, longer."
    assert first_half("A.\n\nB.\n\nC.") == "A.\n\nB."  # ceil(n / 2) paragraphs
    assert first_half("One. Two! Three? Four.") == "One. Two!"  # one paragraph: sentences
    assert first_half("无标点的一句") == "无标点的一句"
    assert leading_fraction(TEXT) == "First point.\n\nSecond point, longer."  # int(4 * 2/3)
    assert leading_fraction("Only one.") == "Only one."
    with pytest.raises(ValueError, match=r"fraction=0: needs 0 < fraction <= 1"):
        leading_fraction(TEXT, 0)


def test_the_acceptance_filters():
    assert (
        ends_a_sentence("Done.") and ends_a_sentence('He said "stop!"') and ends_a_sentence("好。")
    )
    assert not ends_a_sentence("and then") and not ends_a_sentence("a list:")
    words = " ".join(f"w{i}" for i in range(40))
    assert not repeats_ngram(words) and repeats_ngram(words + " " + words)
    assert not repeats_ngram(" ".join(["x"] * 13)) and repeats_ngram(" ".join(["x"] * 14))
    source = "one two three four five six seven eight nine ten."
    longer = source[:-1] + " eleven twelve."
    assert check_extension(source, longer) == []  # 12 >= 1.2 * 10 words
    assert check_extension(source, source) == ["too_short"]
    assert check_extension(source, longer[:-1]) == ["unfinished"]
    assert check_extension("a.", (words + " ") * 2 + "end.") == ["repetition"]
