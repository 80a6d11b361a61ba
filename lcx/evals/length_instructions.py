"""Writing instructions that name a required length in words, for length-following
evaluation (`lcx.evals.length_following`).

The built-in set asks in LongBench-Write's form (LongWriter, Bai et al., arXiv
2408.07055: write N words on a topic) under LonGen's three constraints (Self-Lengthen,
Quan et al., arXiv 2410.23933): about, at least and at most N words, scored on
`longen_window`'s windows ("about", "above", "below"). Instruction i of a set over W
lengths asks for `words[j]` words under constraint `(j + b) % 3` (i = b·W + j), so 3·W
instructions hold every (length, constraint) pair once; topics and forms are drawn from
the seed. A user's set is JSONL, one `{"instruction", "required_words"[, "kind"]}` a line
(`kind` one of "about", "above", "below"; "about" when absent).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from lcx.errors import UserError
from lcx.evals.length import LONGEN_WINDOWS, longen_window

# kind (a LonGen window) -> how an instruction says it.
PHRASES = {"about": "about", "above": "at least", "below": "at most"}
KINDS = tuple(PHRASES)
FORMS = ("essay", "story", "letter", "article", "report", "speech", "guide", "review")
TOPICS = (
    "the history of the printing press",
    "a day in the life of a lighthouse keeper",
    "why cities plant trees along their streets",
    "how a river shapes the valley it runs through",
    "learning to cook for the first time",
    "the first voyage around the world",
    "what makes a good teacher",
    "the life cycle of a star",
    "a small town preparing for a winter storm",
    "how bees find their way home",
    "the invention of the telephone",
    "a friendship that began at a train station",
    "why people keep diaries",
    "the role of libraries in a modern city",
    "climbing a mountain at night",
    "the history of chess",
    "how bread is made, from field to table",
    "a robot that learns to paint",
    "the importance of sleep",
    "an old map found in an attic",
    "how volcanoes form new islands",
    "the first day at a new job",
    "why we study ancient languages",
    "a market in the early morning",
    "how computers store numbers",
    "the migration of whales",
    "a letter from the future",
    "the design of a bridge",
    "growing vegetables on a balcony",
    "the sound of rain on a tin roof",
)
INSTRUCTION_KEYS = ("instruction", "required_words", "kind")


@dataclasses.dataclass(frozen=True)
class LengthInstruction:
    """A writing instruction and the length in words it asks for: about it, at least it
    ("above") or at most it ("below")."""

    instruction: str
    required_words: int
    kind: str = "about"

    def __post_init__(self):
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f"instruction={self.instruction!r}: a non-empty string")
        words = self.required_words
        if isinstance(words, bool) or not isinstance(words, int) or words <= 0:
            raise ValueError(f"required_words={words!r}: a positive whole number of words")
        if self.kind not in LONGEN_WINDOWS:
            raise ValueError(f"kind={self.kind!r}; valid: {sorted(LONGEN_WINDOWS)}")

    @property
    def window(self) -> tuple[float, float]:
        """LonGen's target window [lo, hi] in words."""
        return longen_window(self.required_words, self.kind)


def builtin_instructions(words, seed: int, count: int | None = None) -> list[LengthInstruction]:
    """The built-in set over the required lengths `words` (in words), seeded.

    Args:
      words: the required lengths, e.g. (50, 100, 200, 400, 800).
      seed: draws each instruction's topic and form.
      count: instructions (default 3·len(words): every length under every constraint).
    """
    words = [int(w) for w in words]
    if not words or min(words) <= 0:
        raise ValueError(f"words={words!r}: positive lengths in words")
    count = 3 * len(words) if count is None else count
    if count <= 0:
        raise ValueError(f"count={count!r}: at least one instruction")
    rng = np.random.default_rng([seed, 28])
    topics = rng.permutation(len(TOPICS))
    out = []
    for i in range(count):
        j, block = i % len(words), i // len(words)
        n, kind = words[j], KINDS[(j + block) % len(KINDS)]
        form = FORMS[int(rng.integers(len(FORMS)))]
        topic = TOPICS[int(topics[i % len(TOPICS)])]
        text = f"Write {_article(form)} {form} on {topic} in {PHRASES[kind]} {n} words."
        out.append(LengthInstruction(text, n, kind))
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def read_instructions(path: str) -> list[LengthInstruction]:
    """A JSONL file of {"instruction", "required_words"[, "kind"]}; a malformed line is a
    one-line error naming file:line."""
    if not os.path.isfile(path):
        raise UserError(f"evals.length.file={path!r} is not a file")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected an object with keys {INSTRUCTION_KEYS}")
                unknown = sorted(set(row) - set(INSTRUCTION_KEYS))
                if unknown or "instruction" not in row or "required_words" not in row:
                    raise ValueError(
                        f"keys {sorted(row)}: needs instruction and required_words (and "
                        f"optionally kind), nothing else"
                    )
                out.append(LengthInstruction(**row))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise UserError(f"evals.length.file: {path}:{number}: {e}") from None
    if not out:
        raise UserError(f"evals.length.file={path!r} holds no instruction")
    return out
