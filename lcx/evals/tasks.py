"""Synthetic long-context tasks, deterministic per seed and exact in prompt length.

The task types follow ProLong's advice (Gao et al., arXiv 2410.02660) to test several
kinds of context use rather than one needle: key-value retrieval and multi-needle recall
(RULER, Hsieh et al., arXiv 2404.06654; the JSON key-value task of Liu et al., "Lost in
the Middle", arXiv 2307.03172), variable tracking (RULER), copying a long span, and
many-shot in-context classification with arbitrary label words. Every prompt ends where
the answer starts, on a colon; the model is to continue with a space, the one-line
answer and a newline. A prompt is built to a requested length in
tokens of the tokenizer in use: as many items as fit, then filler text to the exact
count (within a token or two for a BPE tokenizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lcx.errors import UserError

WORDS = (
    "river stone cloud maple copper lantern orbit velvet harbor meadow quartz ember "
    "falcon willow canyon breeze marble summit pepper garnet thistle cobalt juniper "
    "prairie glacier saffron tundra walnut indigo coral lichen basalt cedar "
    "dune fjord grove heron island jasper kettle lagoon mesa nectar oasis pebble "
    "quill reef sable timber umber vale wharf yarrow zephyr acorn birch cinder"
).split()
LABELS = ("mango", "violet", "seven", "Oslo", "tractor", "hymn", "cobra", "denim")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and its one-line answer (and, for classification, the label choices)."""

    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()


def _hex(rng, n=8) -> str:
    """n random lowercase hex digits."""
    return "".join(rng.choice(list("0123456789abcdef"), n))


def _sentence(rng) -> str:
    """A filler sentence of 6-10 words."""
    words = rng.choice(WORDS, int(rng.integers(6, 11)))
    return " ".join(words).capitalize() + "."


def _distinct(rng, n, draw):
    """n distinct values of draw(rng)."""
    out, seen = [], set()
    while len(out) < n:
        value = draw(rng)
        if value not in seen:
            out.append(value)
            seen.add(value)
    return out


# Each builder: (rng, number of context items) -> Example.


def kv_retrieval(rng, n) -> Example:
    """A JSON object of random hex keys and values; the value of one key."""
    n = max(n, 1)
    keys = _distinct(rng, n, _hex)
    values = [_hex(rng) for _ in keys]
    target = int(rng.integers(n))
    body = ", ".join(f'"{k}": "{v}"' for k, v in zip(keys, values, strict=True))
    prompt = (
        "Extract the value of the key from the JSON object.\n{" + body + "}\n"
        f'Key: "{keys[target]}"\nValue:'
    )
    return Example("kv_retrieval", prompt, values[target])


def multi_needle(rng, n, needles=4) -> Example:
    """Sentences with several 'magic number' needles; all their numbers, in order asked."""
    names = _distinct(rng, needles, lambda r: str(r.choice(WORDS)))
    numbers = [str(int(rng.integers(100_000, 1_000_000))) for _ in names]
    lines = [_sentence(rng) for _ in range(max(n, 0))]
    for name, number in zip(names, numbers, strict=True):
        lines.insert(int(rng.integers(len(lines) + 1)), f"The magic number for {name} is {number}.")
    prompt = " ".join(lines) + f"\nWhat are the magic numbers for {', '.join(names)}?\nAnswer:"
    return Example("multi_needle", prompt, ", ".join(numbers))


def variable_tracking(rng, n, chain=4) -> Example:
    """Assignments, one chain from a number among noise; every name bound to that number."""
    names = _distinct(
        rng, chain + max(n, 0), lambda r: "".join(r.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"), 4))
    )
    value = int(rng.integers(10_000, 100_000))
    noise = [f"VAR {name} = {int(rng.integers(10_000, 100_000))}" for name in names[chain:]]
    noise = [line for line in noise if not line.endswith(str(value))]
    spots = np.sort(rng.choice(len(noise) + chain, chain, replace=False))
    lines, chained = list(noise), names[:chain]
    for i, spot in enumerate(spots):
        source = str(value) if i == 0 else chained[i - 1]
        lines.insert(int(spot), f"VAR {chained[i]} = {source}")
    prompt = "\n".join(lines) + f"\nWhich variables hold the value {value}?\nAnswer:"
    return Example("variable_tracking", prompt, " ".join(chained))


def copy_span(rng, n, span_words=16) -> Example:
    """A marked span of random words in filler; the span, copied."""
    span = " ".join(rng.choice(WORDS, span_words))
    lines = [_sentence(rng) for _ in range(max(n, 0))]
    lines.insert(int(rng.integers(len(lines) + 1)), f"[SPAN] {span} [/SPAN]")
    prompt = " ".join(lines) + "\nCopy the text between [SPAN] and [/SPAN].\nText:"
    return Example("copy_span", prompt, span)


def icl_classification(rng, n, classes=4, clue_words=3) -> Example:
    """Many labelled shots whose label words are arbitrary; the label of a new input.

    Each class owns `clue_words` words; an input is two of its class's words and two
    random ones, shuffled. Chance is 1 / classes.
    """
    vocabulary = rng.permutation(WORDS)
    clues = [vocabulary[c * clue_words : (c + 1) * clue_words] for c in range(classes)]
    labels = tuple(str(x) for x in rng.permutation(LABELS)[:classes])

    def shot(label):
        words = [*rng.choice(clues[label], 2), *rng.choice(vocabulary[classes * clue_words :], 2)]
        return " ".join(rng.permutation(words))

    shots = [(shot(c), labels[c]) for c in rng.integers(classes, size=max(n, 1))]
    target = int(rng.integers(classes))
    context = "".join(f"Input: {text}\nLabel: {label}\n" for text, label in shots)
    prompt = context + f"Input: {shot(target)}\nLabel:"
    return Example("icl_classification", prompt, labels[target], labels)


# Task name -> builder: one line per task.
TASKS: dict[str, Callable] = {
    "kv_retrieval": kv_retrieval,
    "multi_needle": multi_needle,
    "variable_tracking": variable_tracking,
    "copy_span": copy_span,
    "icl_classification": icl_classification,
}
FILLER = " ."


def prompt_length(tokenizer, text: str) -> int:
    """Tokens of a prompt: [BOS] + its tokens (no EOS)."""
    return len(tokenizer.encode(text.encode("utf-8"))) - (1 if tokenizer.add_eos else 0)


def make_example(task: str, length: int, seed: int, tokenizer) -> Example:
    """An example of `task` whose prompt is `length` tokens (within a token or two).

    The most context items that fit are found by bisection (the example with n items is
    drawn from the seed (seed, n)), then filler (" ." repeated) at the prompt's start
    fills the rest, also by bisection.
    """
    if task not in TASKS:
        raise UserError(f"evals.tasks: {task!r} is not a task; valid: {sorted(TASKS)}")
    build = TASKS[task]

    def example(n, filler=0):
        made = build(np.random.default_rng([seed, n]), n)
        return dataclasses.replace(made, prompt=FILLER * filler + made.prompt)

    def size(n, filler=0):
        return prompt_length(tokenizer, example(n, filler).prompt)

    if size(0) > length:
        raise UserError(f"evals.lengths: {length} tokens cannot hold a {task} prompt ({size(0)})")
    low, high = 0, 1
    while size(high) <= length:
        low, high = high, high * 2
    while high - low > 1:  # the most items that fit: size(low) <= length < size(high)
        mid = (low + high) // 2
        low, high = (mid, high) if size(mid) <= length else (low, mid)
    short, long = 0, length
    while long - short > 1:  # the most filler that fits
        mid = (short + long) // 2
        short, long = (mid, long) if size(low, mid) <= length else (short, mid)
    return example(low, short)


def make_examples(task: str, length: int, count: int, seed: int, tokenizer) -> list[Example]:
    """`count` examples of `task` at `length` tokens, example i seeded by (seed, i)."""
    return [make_example(task, length, seed * 1_000_003 + i, tokenizer) for i in range(count)]
