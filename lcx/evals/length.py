"""Length-following scores: how close a generated text's length is to the one asked for.

- `sl_score(required, produced)`: LongBench-Write's length score S_l (LongWriter,
  arXiv 2408.07055): 100 at the required length x, falling linearly to 0 at 4x above
  and at x/3 below: 100·max(0, 1 − (y/x − 1)/3) when y > x, else
  100·max(0, 1 − (x/y − 1)/2).
- `range_score(produced, lo, hi)`: LonGen's length-following score for a target window
  [lo, hi] (Self-Lengthen, arXiv 2410.23933): 1 inside, max(2L/lo − 1, 0) below,
  max(3 − 2L/hi, 0) above; `longen_window` gives the paper's windows for "about",
  "above" and "below" x.
- `word_count(text)`: Self-Lengthen's length unit: words, each CJK character one word.
- `length_spread(lengths)`: mean, standard deviation and 90th percentile of one
  prompt's sampled output lengths (CASTILLO, arXiv 2505.16881: one sample says little).
- `repeats_ngram(text)`: whether a 13-gram of words occurs twice, Self-Lengthen's
  repetition filter (and the repetition rate `mode=evaluate` reports).

`lcx.evals.length_following` builds `mode=evaluate`'s length-following report on these.
"""

from __future__ import annotations

import re

import numpy as np

# Words: runs of letters, digits or apostrophes; each CJK ideograph, kana or hangul
# syllable counts on its own (as Self-Lengthen counts Chinese characters).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}\W]+(?:['’][^\s{_CJK}\W]+)*")

# LonGen's target windows as fractions of the length x the instruction names.
LONGEN_WINDOWS = {"about": (0.8, 1.2), "above": (1.0, 1.5), "below": (0.5, 1.0)}
NGRAM = 13  # Self-Lengthen's repetition filter: no repeated n-gram of this many words
_TOKENS = re.compile(r"\S+")


def sl_score(required: float, produced: float) -> float:
    """LongBench-Write's S_l in [0, 100] for a text of `produced` units asked to be
    `required` long (any unit, the same for both)."""
    if not required > 0:
        raise ValueError(f"required={required!r}: the required length must be positive")
    if produced < 0:
        raise ValueError(f"produced={produced!r}: a length cannot be negative")
    x, y = float(required), float(produced)
    if y > x:
        return 100.0 * max(0.0, 1.0 - (y / x - 1.0) / 3.0)
    if y == 0:
        return 0.0  # the limit of the formula below as y -> 0
    return 100.0 * max(0.0, 1.0 - (x / y - 1.0) / 2.0)


def range_score(produced: float, lo: float, hi: float) -> float:
    """LonGen's score in [0, 1] for a text of `produced` units, target window [lo, hi]."""
    if not 0 < lo <= hi:
        raise ValueError(f"lo={lo!r}, hi={hi!r}: the window needs 0 < lo <= hi")
    length = float(produced)
    if length < lo:
        return max(2.0 * length / lo - 1.0, 0.0)
    if length > hi:
        return max(3.0 - 2.0 * length / hi, 0.0)
    return 1.0


def longen_window(required: float, constraint: str = "about") -> tuple[float, float]:
    """LonGen's window for "about", "above" or "below" `required` units."""
    if constraint not in LONGEN_WINDOWS:
        raise ValueError(f"constraint={constraint!r}; valid: {sorted(LONGEN_WINDOWS)}")
    low, high = LONGEN_WINDOWS[constraint]
    return low * required, high * required


def word_count(text: str) -> int:
    """Words of `text`, each CJK character counting as one."""
    return len(_WORD.findall(text))


def length_spread(lengths) -> dict:
    """{mean, std, p90, n} of one prompt's output lengths over its samples."""
    values = np.asarray(lengths, np.float64)
    if values.size == 0:
        raise ValueError("lengths is empty: give the lengths of at least one sample")
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p90": float(np.percentile(values, 90)),
        "n": int(values.size),
    }


def repeats_ngram(text: str, n: int = NGRAM) -> bool:
    """Whether some n-gram of whitespace-separated words occurs twice in `text`."""
    words = _TOKENS.findall(text)
    seen = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False
