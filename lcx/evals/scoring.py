"""Scoring: exact match and RULER's string_match_all of generations, answer likelihood.

A model is anything with `context` (tokens), `generate(prompts, max_new_tokens)` and
`score_tokens(sequences)`; `TransformerLM` is an lcx Transformer through the serving
engine (generation) and packed rows (likelihood: many sequences per row, attention kept
within each). Generation-based exact match needs a model able to follow the format;
the answer's log-likelihood and its teacher-forced token accuracy grade a model too small
to generate it. string_match_all (RULER, Hsieh et al., arXiv 2404.06654) gives partial
credit: the fraction of an example's expected strings (each needle's number, each
variable's name, each common word) found in the generation's first line, ignoring case.
A prompt that does not fit the context is an error, never truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lcx.data.tokenizer import prompt_ids, text_ids
from lcx.errors import UserError
from lcx.evals.tasks import Example
from lcx.generate.scoring import PackedScorer


class LanguageModel(Protocol):
    """What the scorers need of a model."""

    context: int

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids) of each prompt."""

    def score_tokens(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, for t >= 1: log p(token t | tokens < t) and whether it is the argmax."""


def continuation(answer: str) -> str:
    """What a model should write after a prompt: a space, the answer, a newline."""
    return f" {answer}\n"


def split_ids(tokenizer, prompt: str, answer: str, head=None) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer-continuation tokens) as the tokenizer splits them together.

    A BPE tokenizer may merge across the boundary; then the prompt's own tokens and the
    continuation's are used (the boundary is kept, the merge is not). `head`: the
    prompt's tokens, when already known.
    """
    head = prompt_ids(tokenizer, prompt) if head is None else head
    whole = prompt_ids(tokenizer, prompt + continuation(answer))
    if whole[: len(head)] == head:
        return head, whole[len(head) :]
    return head, text_ids(tokenizer, continuation(answer))


def chat_split_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of a model fine-tuned on conversations: the prompt
    as one user turn through the tokenizer's chat template with the generation prompt,
    the answer as the assistant turn that follows (its end of turn included)."""
    user = [{"role": "user", "content": prompt}]
    head = list(tokenizer.apply_chat_template(user, add_generation_prompt=True))
    whole = list(tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}]))
    if whole[: len(head)] != head:
        raise UserError(
            "evals: the chat template renders a user turn with the generation prompt "
            "differently from the same turn followed by the answer; cannot score it"
        )
    return head, whole[len(head) :]


def first_line(text: str) -> str:
    """A completion's first line, stripped: what exact match compares."""
    return text.split("\n", 1)[0].strip()


def string_match_all(output: str, expected: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of `expected` found in `output`, ignoring case."""
    text = output.lower()
    return sum(s.lower() in text for s in expected) / len(expected)


def check_fits(examples_ids, new_tokens: int, context: int, what: str) -> None:
    """ValueError when a prompt plus its new tokens exceed the model's context."""
    longest = max(len(ids) for ids in examples_ids)
    if longest + new_tokens > context:
        raise UserError(
            f"evals: {what}: a prompt of {longest} tokens plus {new_tokens} to generate exceeds "
            f"the model's context of {context} tokens (prompts are never truncated; raise "
            "evals.context or lower evals.lengths)"
        )


def score_examples(
    lm: LanguageModel,
    tokenizer,
    examples: Sequence[Example],
    *,
    generate: bool = True,
    chat: bool = False,
) -> dict:
    """Mean exact match and string_match_all (greedy generation), answer log-likelihood
    per token, teacher-forced token accuracy and, with label choices, the likelihood's
    choice accuracy.
    `chat`: prompts and answers as conversation turns (`chat_split_ids`), for a model
    fine-tuned on conversations (`data.format = "chat"`)."""
    split = chat_split_ids if chat else split_ids
    pairs = [split(tokenizer, ex.prompt, ex.answer) for ex in examples]
    what = f"{examples[0].task} at {len(pairs[0][0])} tokens"
    new = max(len(a) for _, a in pairs) + 4
    check_fits([p + a for p, a in pairs], 0, lm.context, what)
    out = {"examples": len(examples)}
    if generate:
        check_fits([p for p, _ in pairs], new, lm.context, what)
        completions = lm.generate([p for p, _ in pairs], new)
        texts = [tokenizer.decode(c).decode("utf-8", "replace") for c in completions]
        graded = [(first_line(t), ex) for t, ex in zip(texts, examples, strict=True)]
        out["exact_match"] = float(np.mean([line == ex.answer for line, ex in graded]))
        matched = [string_match_all(line, ex.targets) for line, ex in graded]
        out["string_match_all"] = float(np.mean(matched))
    scores = lm.score_tokens([p + a for p, a in pairs])
    logprob, accuracy = [], []
    for (p, _), (lp, top) in zip(pairs, scores, strict=True):
        logprob.append(float(np.mean(lp[len(p) - 1 :])))
        accuracy.append(float(np.mean(top[len(p) - 1 :])))
    out["answer_logprob"] = float(np.mean(logprob))
    out["answer_token_accuracy"] = float(np.mean(accuracy))
    if examples[0].choices:
        out["choice_accuracy"] = _choice_accuracy(lm, tokenizer, examples, chat)
    return out


def _choice_accuracy(lm, tokenizer, examples, chat: bool = False) -> float:
    """How often the answer is the most likely of the example's choices."""
    sequences, spans = [], []
    for ex in examples:
        prompt = None if chat else prompt_ids(tokenizer, ex.prompt)  # once per example
        for choice in ex.choices:
            if chat:
                head, tail = chat_split_ids(tokenizer, ex.prompt, choice)
            else:
                head, tail = split_ids(tokenizer, ex.prompt, choice, head=prompt)
            sequences.append(head + tail)
            spans.append(len(head) - 1)
    totals = [
        float(np.sum(lp[s:])) for (lp, _), s in zip(lm.score_tokens(sequences), spans, strict=True)
    ]
    correct, i = [], 0
    for ex in examples:
        k = len(ex.choices)
        correct.append(ex.choices[int(np.argmax(totals[i : i + k]))] == ex.answer)
        i += k
    return float(np.mean(correct))


class TransformerLM:
    """An lcx Transformer as a LanguageModel: engine generation, packed-row likelihoods."""

    def __init__(self, model, tokenizer, context: int, *, slots: int = 8, token_budget: int = 512):
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.slots, self.token_budget = slots, token_budget
        self._engine = None
        self._scorer = PackedScorer(model, context, tokenizer.pad_id, top=1)

    def generate(self, prompts, max_new_tokens):
        from lcx.generate import Engine, Request, SamplingParams

        if self._engine is None:  # one engine (one compilation) for every call
            self._engine = Engine(
                self.model,
                slots=self.slots,
                max_length=self.context,
                token_budget=self.token_budget,
            )
        stop = () if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)
        ids = [
            self._engine.submit(Request(p, max_new_tokens, SamplingParams(0.0), stop))
            for p in prompts
        ]
        results = self._engine.run()
        return [results.pop(i) for i in ids]

    def score_tokens(self, sequences):
        check_fits(sequences, 0, self.context, "score_tokens")
        return [(s.logprob, s.is_greedy) for s in self._scorer.score(sequences)]
