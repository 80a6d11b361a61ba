"""Length-following evaluation: does a model write as many words as it is asked to?

Every instruction (`lcx.evals.length_instructions`) gets `samples` responses, sampled
with a temperature and seeded, all in one run of the serving engine (`lcx.generate`:
continuous batching, so short responses free their slots for the rest while long ones
go on). A model fine-tuned on conversations (`data.format = "chat"`) is prompted with
the instruction as one user turn through its tokenizer's chat template; any other with
[BOS] + the instruction + a newline. The report (`length_report`):
- `sl_score`: the mean over all responses of LongBench-Write's S_l (LongWriter, arXiv
  2408.07055) against the required length, in words (`lcx.evals.length.word_count`);
- `range_score`: the mean of LonGen's window score (Self-Lengthen, arXiv 2410.23933) on
  each instruction's window (about / at least / at most N words);
- `repeated_13gram_rate`: the share of responses repeating a 13-gram of words
  (Self-Lengthen's repetition filter);
- `truncated_rate`: the share that reached `max_new_tokens` before a stop token (their
  length is a floor: S_l may be too high for them, never too low);
- per instruction, the spread of its responses' lengths (mean, std, p90: CASTILLO,
  arXiv 2505.16881, since one sample says little about a model's length behaviour), and
  the same per required length (`by_required`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lcx.data.sft import turn_stop_ids
from lcx.data.tokenizer import prompt_ids, text_ids
from lcx.errors import UserError
from lcx.evals.length import length_spread, range_score, repeats_ngram, sl_score, word_count
from lcx.evals.length_instructions import (
    LengthInstruction,
    builtin_instructions,
    read_instructions,
)
from lcx.generate.api import generate

TASK = "length_following"  # the `task` of its record in WORKDIR/evals.jsonl
HEADROOM = 2.0  # the automatic budget: this many times the longest requirement's tokens
# English prose: its tokens per word turn a length in words into one in tokens.
PROSE = (
    "The river runs past the old mill and under the stone bridge, where children fish on "
    "summer evenings. In winter the water slows, the banks freeze, and the town gathers "
    "to skate beneath the lanterns. Nobody remembers who built the bridge, but everyone "
    "has a story about it, and each story grows a little longer every year."
)

# (prompts, max_new_tokens) -> the new tokens of each prompt, sampled.
Sampler = Callable[[list[list[int]], int], list[list[int]]]


def parse_words(value: str) -> list[int]:
    """`evals.length.words` ("50,100,...") as positive lengths in words."""
    try:
        words = [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        words = []
    if not words or min(words) <= 0:
        raise UserError(f"evals.length.words={value!r}: comma-separated positive word counts")
    return words


def load_instructions(ls, seed: int) -> list[LengthInstruction]:
    """The instruction set of `config.evals.length` (LengthEvalSettings): the file's, or
    the built-in one over `words` drawn from `seed`; its settings checked."""
    for key in ("samples", "max_new_tokens", "slots", "temperature"):
        least = 1 if key == "samples" else 0
        if getattr(ls, key) < least:
            raise UserError(f"evals.length.{key}={getattr(ls, key)!r}: at least {least}")
    if ls.file:
        return read_instructions(ls.file)
    return builtin_instructions(parse_words(ls.words), seed)


def instruction_prompt(tokenizer, instruction: str, *, chat: bool) -> list[int]:
    """The prompt tokens of one instruction: a user turn through the chat template with
    the generation prompt (`chat`), else [BOS] + the instruction + a newline."""
    if chat:
        user = [{"role": "user", "content": instruction}]
        return list(tokenizer.apply_chat_template(user, add_generation_prompt=True))
    return prompt_ids(tokenizer, instruction + "\n")


def tokens_per_word(tokenizer) -> float:
    """The tokenizer's tokens per word on English prose."""
    return len(text_ids(tokenizer, PROSE)) / word_count(PROSE)


def new_token_budget(
    tokenizer, required_words: int, longest_prompt: int, context: int, max_new_tokens: int = 0
) -> int:
    """New tokens per response: `max_new_tokens`, or with 0, HEADROOM times what the
    longest requirement takes, at most what `context` leaves after the longest prompt. A
    UserError when the budget does not fit the context or cannot reach the requirement."""
    room = context - longest_prompt
    if max_new_tokens:
        if max_new_tokens > room:
            raise UserError(
                f"evals.length.max_new_tokens={max_new_tokens}: a prompt of {longest_prompt} "
                f"tokens leaves {room} of evals.context={context}"
            )
        return max_new_tokens
    need = math.ceil(tokens_per_word(tokenizer) * required_words)
    if need > room:
        raise UserError(
            f"evals.length: a response of {required_words} words takes about {need} tokens, "
            f"but evals.context={context} leaves {room} after a prompt of {longest_prompt}; "
            "raise evals.context or lower the required lengths (evals.length.words)"
        )
    return min(math.ceil(HEADROOM * need), room)


def length_report(
    instructions: Sequence[LengthInstruction], texts: Sequence[str], samples: int, truncated=None
) -> dict:
    """The scores of `texts`: `samples` responses per instruction, instruction-major
    (responses i·samples ... (i + 1)·samples - 1 answer instruction i)."""
    if samples < 1 or len(texts) != len(instructions) * samples:
        raise ValueError(
            f"len(texts)={len(texts)}: expected samples={samples} per instruction for "
            f"{len(instructions)} instructions"
        )
    asked = [ins for ins in instructions for _ in range(samples)]
    words = np.asarray([word_count(t) for t in texts])
    sl = np.asarray([sl_score(ins.required_words, n) for ins, n in zip(asked, words, strict=True)])
    rs = np.asarray([range_score(n, *ins.window) for ins, n in zip(asked, words, strict=True)])
    repeated = np.asarray([repeats_ngram(t) for t in texts], np.float64)

    def scores(rows) -> dict:
        return {
            "sl_score": float(sl[rows].mean()),
            "range_score": float(rs[rows].mean()),
            "repeated_13gram_rate": float(repeated[rows].mean()),
            "words": length_spread(words[rows]),
        }

    prompts = [
        {
            "instruction": ins.instruction,
            "required_words": ins.required_words,
            "kind": ins.kind,
            "window": list(ins.window),
            **scores(slice(i * samples, (i + 1) * samples)),
        }
        for i, ins in enumerate(instructions)
    ]
    required = np.asarray([ins.required_words for ins in asked])
    by_required = [
        {"required_words": int(n), **scores(required == n)} for n in sorted(set(required.tolist()))
    ]
    out = {"task": TASK, "instructions": len(instructions), "samples": samples}
    out.update(scores(slice(None)))
    if truncated is not None:
        out["truncated_rate"] = float(np.mean(np.asarray(truncated, np.float64)))
    return {**out, "by_required": by_required, "prompts": prompts}


def evaluate_length_following(
    sampler: Sampler,
    tokenizer,
    instructions: Sequence[LengthInstruction],
    *,
    samples: int,
    context: int,
    chat: bool = False,
    max_new_tokens: int = 0,
    stop_ids: Sequence[int] = (),
) -> dict:
    """The length-following report of a model.

    Args:
      sampler: (prompts, max_new_tokens) -> sampled new tokens per prompt
        (`engine_sampler` for an lcx Transformer).
      tokenizer: the model's tokenizer (decodes the responses).
      instructions: the instruction set.
      samples: responses per instruction.
      context: the longest prompt + response allowed.
      chat: prompt through the tokenizer's chat template.
      max_new_tokens: new tokens per response; 0 for `new_token_budget`'s automatic one.
      stop_ids: the tokens that end a response (left out of its text).

    Returns:
      `length_report`'s record, with `max_new_tokens` and `chat`.
    """
    prompts = [instruction_prompt(tokenizer, i.instruction, chat=chat) for i in instructions]
    longest = max(i.required_words for i in instructions)
    budget = new_token_budget(tokenizer, longest, max(map(len, prompts)), context, max_new_tokens)
    outputs = sampler([p for p in prompts for _ in range(samples)], budget)
    texts, truncated = [], []
    for ids in outputs:
        ids = list(ids)
        stopped = bool(ids) and ids[-1] in stop_ids
        truncated.append(not stopped and len(ids) >= budget)
        body = ids[:-1] if stopped else ids
        texts.append(tokenizer.decode(body).decode("utf-8", "replace").strip())
    report = length_report(instructions, texts, samples, truncated)
    return {**report, "max_new_tokens": budget, "chat": chat}


def engine_sampler(model, *, temperature: float, seed: int, slots: int = 0, stop_ids=()) -> Sampler:
    """A Sampler over an lcx Transformer: every prompt in one `lcx.generate.generate`
    call (response i seeded by (seed, i)); `slots` sequences at once, 0 for all."""

    def sample(prompts, max_new_tokens):
        return generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            slots=min(slots, len(prompts)) if slots else None,
            stop_ids=tuple(stop_ids),
        )

    return sample


def length_following(model, tokenizer, ec, instructions=None, *, chat: bool = False) -> dict:
    """The length-following record of `config.evals` (EvalsSettings) for an lcx
    Transformer; `instructions`: `load_instructions(ec.length, ec.seed)` when None."""
    ls = ec.length
    instructions = load_instructions(ls, ec.seed) if instructions is None else instructions
    if chat:  # a template's end of turn (Llama 3's <|eot_id|>) may not be its EOS
        stop = turn_stop_ids(tokenizer)
    else:
        stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    sampler = engine_sampler(
        model, temperature=ls.temperature, seed=ec.seed, slots=ls.slots, stop_ids=stop
    )
    report = evaluate_length_following(
        sampler,
        tokenizer,
        instructions,
        samples=ls.samples,
        context=ec.context,
        chat=chat,
        max_new_tokens=ls.max_new_tokens,
        stop_ids=stop,
    )
    return {**report, "temperature": ls.temperature, "file": ls.file}


def summary_lines(record: dict) -> list[str]:
    """Two lines of a length-following record for the evaluation table."""
    head = (
        f"length following ({record['instructions']} instructions x {record['samples']} "
        f"samples, <= {record['max_new_tokens']} new tokens): S_l {record['sl_score']:.1f}, "
        f"LonGen {record['range_score']:.2f}, repeated 13-gram "
        f"{record['repeated_13gram_rate']:.2f}, truncated {record.get('truncated_rate', 0):.2f}"
    )
    cells = [
        f"{b['required_words']}: {b['words']['mean']:.0f} (p90 {b['words']['p90']:.0f})"
        for b in record["by_required"]
    ]
    return [head, "words asked: produced mean (p90): " + ", ".join(cells)]
