"""Self-Lengthen's text operations and filters (Quan et al., arXiv 2410.23933;
QwenLM/Self-Lengthen).

Each round the Extender gets an instruction and the first half of a response (split on
blank lines, `first_half`), rewrites that half longer, keeps the first two thirds of its
rewrite (`leading_fraction`) and continues from there to the end. A result is accepted
(`check_extension`) when it is at least `min_ratio` (1.2) times its source's length,
ends in sentence-final punctuation and repeats no 13-gram of words. Lengths are
`lcx.evals.length.word_count`: words, each CJK character one.

The rounds themselves (generation through `lcx.generate`, fine-tuning both roles) are
still to come (issue 28 item 6).
"""

from __future__ import annotations

import re

from lcx.evals.length import word_count

MIN_RATIO = 1.2  # an extension at least this many times its source's length
NGRAM = 13  # no repeated n-gram of this many words
KEEP = 2 / 3  # the share of the rewritten half the Extender continues from

_PARAGRAPHS = re.compile(r"\n\s*\n")
# A sentence ends in . ! ? … or their CJK forms, perhaps then closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]」』】）]*$")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])[\"'”’)\]」』】）]*\s+")
_WORDS = re.compile(r"\S+")


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs (split on blank lines), stripped, empty ones dropped."""
    return [p.strip() for p in _PARAGRAPHS.split(text) if p.strip()]


def first_half(text: str) -> str:
    """The first half of `text` for the Extender: its first ceil(n/2) paragraphs, or
    with one paragraph, its sentences up to the middle (at least one)."""
    parts = paragraphs(text)
    if len(parts) > 1:
        return "\n\n".join(parts[: (len(parts) + 1) // 2])
    sentences = [s for s in _SENTENCE_BREAK.split(text.strip()) if s]
    if len(sentences) <= 1:
        return text.strip()
    return " ".join(sentences[: max(1, len(sentences) // 2)])


def leading_fraction(text: str, fraction: float = KEEP) -> str:
    """The first `fraction` of the paragraphs of `text` (at least one), where the
    Extender's continuation starts."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r}: needs 0 < fraction <= 1")
    parts = paragraphs(text)
    keep = max(1, int(len(parts) * fraction))
    return "\n\n".join(parts[:keep])


def ends_a_sentence(text: str) -> bool:
    """Whether `text` ends in sentence-final punctuation (a finished text)."""
    return bool(_SENTENCE_END.search(text.rstrip()))


def repeats_ngram(text: str, n: int = NGRAM) -> bool:
    """Whether some n-gram of whitespace-separated words occurs twice in `text`."""
    words = _WORDS.findall(text)
    seen = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def check_extension(source: str, extended: str, *, min_ratio: float = MIN_RATIO) -> list[str]:
    """The filters `extended` fails as a lengthening of `source`: any of "too_short",
    "unfinished", "repetition"; an empty list accepts it."""
    failed = []
    if word_count(extended) < min_ratio * word_count(source):
        failed.append("too_short")
    if not ends_a_sentence(extended):
        failed.append("unfinished")
    if repeats_ngram(extended):
        failed.append("repetition")
    return failed
