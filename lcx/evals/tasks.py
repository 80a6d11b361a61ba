"""Synthetic long-context tasks, deterministic per seed and exact in prompt length.

The task types follow ProLong's advice (Gao et al., arXiv 2410.02660) to test several
kinds of context use rather than one needle: key-value retrieval and multi-needle recall
(RULER, Hsieh et al., arXiv 2404.06654; the JSON key-value task of Liu et al., "Lost in
the Middle", arXiv 2307.03172), variable tracking (RULER), copying a long span, and
many-shot in-context classification with arbitrary label words. RULER's own tasks
follow its generators (NVIDIA/RULER), scaled down so that each fits a 240-token prompt:
needles in its noise haystack (`niah_single`, `niah_multikey`), its variable tracking
(`ruler_variable_tracking`), common-words extraction (`common_words`) and frequent-words
extraction over Zipf counts (`frequent_words`); each example lists the strings RULER's
string_match_all looks for (`Example.expected`). Every prompt ends where the answer
starts, on a colon; the model is to continue with a space, the one-line answer and a
newline. A prompt is built to a requested length in tokens of the tokenizer in use: as
many items as fit, then filler text to the exact count (within a token or two for a BPE
tokenizer).
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
# RULER's noise haystack, used one sentence at a time.
NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and its one-line answer (and, for classification, the label choices).

    `expected`: the strings a correct output contains (RULER's string_match_all), when
    the answer lists several; () means the answer itself (`targets`).
    """

    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        """The strings string_match_all looks for in an output."""
        return self.expected or (self.answer,)


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
    return Example("multi_needle", prompt, ", ".join(numbers), expected=tuple(numbers))


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
    return Example("variable_tracking", prompt, " ".join(chained), expected=tuple(chained))


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


# RULER's tasks (Hsieh et al., arXiv 2404.06654). Its instructions are left out or cut
# short so that every task fits a 240-token prompt in bytes (the task conversations'
# shortest length).


def _noise(n) -> list[str]:
    """n sentences of RULER's noise haystack, in its order."""
    return [NOISE[i % len(NOISE)] for i in range(max(n, 0))]


def _made_up_words(rng, count) -> list[str]:
    """count distinct pronounceable five-letter non-words (consonant, vowel, consonant, ...)."""
    consonants, vowels = np.array(list("bdfgklmnprstvwz")), np.array(list("aeiou"))
    words: dict[str, None] = {}
    while len(words) < count:  # drawn in batches: long lists hold thousands
        c, v = rng.choice(consonants, (count, 3)), rng.choice(vowels, (count, 2))
        letters = np.stack([c[:, 0], v[:, 0], c[:, 1], v[:, 1], c[:, 2]], axis=1)
        words.update(dict.fromkeys(letters.view("<U5").ravel().tolist()))
    return list(words)[:count]


def _needles(rng, n, needles, task) -> Example:
    """RULER's NIAH: needles of distinct keys in the noise; the number of one key."""
    keys = _distinct(rng, needles, lambda r: "-".join(r.choice(WORDS, 2, replace=False)))
    numbers = _distinct(rng, needles, lambda r: str(int(r.integers(1_000_000, 10_000_000))))
    lines = _noise(n)
    for key, number in zip(keys, numbers, strict=True):
        needle = f"One of the special magic numbers for {key} is: {number}."
        lines.insert(int(rng.integers(len(lines) + 1)), needle)
    target = int(rng.integers(needles))
    question = (
        f"What is the special magic number for {keys[target]} mentioned in the provided text?"
    )
    return Example(task, " ".join(lines) + f"\n{question}\nAnswer:", numbers[target])


def niah_single(rng, n) -> Example:
    """One needle in RULER's noise haystack; its 7-digit number."""
    return _needles(rng, n, 1, "niah_single")


def niah_multikey(rng, n, needles=4) -> Example:
    """Needles of distractor keys (2 in the shortest prompts, up to `needles`); one asked."""
    return _needles(rng, n, min(needles, 2 + n // 8), "niah_multikey")


def ruler_variable_tracking(rng, n, hops=4) -> Example:
    """RULER's form: "VAR A = 12345", hops "VAR B = VAR A" in order among noise lines;
    every name bound to the value, in the order assigned."""
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    names = _distinct(rng, hops + 1, lambda r: "".join(r.choice(letters, 5)))
    value = int(rng.integers(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:], strict=False)]
    lines = _noise(n)
    for j, spot in enumerate(np.sort(rng.integers(len(lines) + 1, size=len(chain)))):
        lines.insert(int(spot) + j, chain[j])  # + j: the earlier links sit before it
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above."
    )
    prompt = "\n".join(lines) + f"\n{question}\nAnswer:"
    return Example("ruler_variable_tracking", prompt, " ".join(names), expected=tuple(names))


def common_words(rng, n) -> Example:
    """RULER's common-words extraction: a numbered list in which a few words recur often
    and the rest rarely; the common words, in the order they first appear.

    `n`: the uncommon words' entries. RULER's 10 words 30 times and the rest 3 times is
    reached from n = 400 on; below, fewer common words (at least 3), fewer repeats (at
    least 3) and the rest once or twice, so that the list fits short prompts.
    """
    n = max(n, 0)
    common_count, common_repeats = min(10, 3 + n // 10), min(30, 3 + n // 6)
    rare_repeats = min(3, 1 + n // 200)
    words = _made_up_words(rng, common_count + n // rare_repeats)
    common = words[:common_count]
    pool = common * common_repeats + words[common_count:] * rare_repeats
    entries = [str(word) for word in rng.permutation(pool)]
    listed = " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
    ordered = tuple(dict.fromkeys(w for w in entries if w in common))
    prompt = (
        f"Below is a numbered list of words. Some appear more often than others.\n{listed}\n"
        f"What are the {common_count} most common words in the list?\nAnswer:"
    )
    return Example("common_words", prompt, ", ".join(ordered), expected=ordered)


def frequent_words(rng, n, top=3, alpha=2.0) -> Example:
    """RULER's frequent-words extraction: coded words counted round(C / rank^alpha), C = 14
    + n, in random order; the `top` most frequent, most frequent first.

    From C = 14 on the counts of ranks 1 to 4 are strictly falling, so the answer is
    unambiguous. RULER's dots noise (its rank 1, to be ignored) is left out for length.
    """
    scale = 14 + max(n, 0)
    counts = [int(scale / rank**alpha + 0.5) for rank in range(1, int((2 * scale) ** 0.5) + 2)]
    counts = [c for c in counts if c > 0]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocabulary = _distinct(rng, len(counts), lambda r: "".join(r.choice(letters, 4)))
    draws = [w for w, c in zip(vocabulary, counts, strict=True) for _ in range(c)]
    answer = tuple(vocabulary[:top])
    prompt = (
        "Track how often each coded word appears in the text below.\n"
        f"{' '.join(rng.permutation(draws))}\n"
        f"What are the {top} most frequent coded words in the text?\nAnswer:"
    )
    return Example("frequent_words", prompt, ", ".join(answer), expected=answer)


# Task name -> builder: one line per task.
TASKS: dict[str, Callable] = {
    "kv_retrieval": kv_retrieval,
    "multi_needle": multi_needle,
    "variable_tracking": variable_tracking,
    "copy_span": copy_span,
    "icl_classification": icl_classification,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "ruler_variable_tracking": ruler_variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}
# The tasks the fine-tuning corpora (lcx.evals.finetune) and configs/data/
# task_conversations.jsonl teach; their recorded results depend on this list, so RULER's
# tasks, added later, are evaluated but not taught.
TAUGHT_TASKS = (
    "kv_retrieval",
    "multi_needle",
    "variable_tracking",
    "copy_span",
    "icl_classification",
)
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
