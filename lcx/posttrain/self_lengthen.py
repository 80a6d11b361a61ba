"""Self-Lengthen's text operations and filters (Quan et al., arXiv 2410.23933;
QwenLM/Self-Lengthen).

Each round the Extender gets an instruction and the first half of a response (split on
blank lines, `first_half`), rewrites that half longer, keeps the first two thirds of its
rewrite (`leading_fraction`) and continues from there to the end. A result is accepted
(`check_extension`) when it is at least `min_ratio` (1.2) times its source's length,
ends in sentence-final punctuation and repeats no 13-gram of words. Lengths are
`lcx.evals.length.word_count`: words, each CJK character one.

The rounds (`run_self_lengthen`, `--config.mode=self_lengthen`, `config.self_lengthen`):
round K, with the Generator and Extender the round before left (both start from
`init.hf_checkpoint`), all generation through `lcx.generate` in large batches:
1. the Generator writes `samples` responses to every instruction;
2. the Extender gets each instruction and the first half of a response and rewrites it
   longer (`ENRICH_PROMPT`); the first two thirds of its rewrite are put in its
   assistant turn and it continues from there to the end; results that fail a filter
   are retried (`retries`, resampled) and counted by filter; of the accepted ones the
   shortest are dropped with probability 1 - 2·rank³ (rank: 0 for the shortest, 1 for
   the longest), as the paper's code does;
3. WORKDIR/self_lengthen/round_K.jsonl gets one accepted sample a line (`instruction`,
   `source`, `response`, `source_tokens`, `response_tokens`), round_K.summary.json the
   counts and the Generator's length statistics;
4. both roles are fine-tuned on conversations (`lcx.posttrain.sft`, the loss on the
   assistant turn): the Generator on instruction -> accepted response, the Extender on
   its prompt built from the source with a `drop_lines` share of lines left out ->
   accepted response, each from its last round's model, exported as a Hugging Face
   directory for the next round.
A killed run restarts in the round it was in: a round with its summary is not
generated again, and each fine-tune resumes from its checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np

from lcx.errors import UserError
from lcx.evals.length import length_spread, repeats_ngram, sl_score, word_count

MIN_RATIO = 1.2  # an extension at least this many times its source's length
KEEP = 2 / 3  # the share of the rewritten half the Extender continues from

_PARAGRAPHS = re.compile(r"\n\s*\n")
# A sentence ends in . ! ? … or their CJK forms, perhaps then closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]」』】）]*$")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])[\"'”’)\]」』】）]*\s+")


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


# --- The rounds ------------------------------------------------------------------------

ENRICH_PROMPT = (
    "Below are an instruction and the first part of a response to it. Rewrite that part "
    "longer and richer in detail: enrich it, do not continue it.\n\n"
    "Instruction: {instruction}\n\nResponse so far:\n{text}"
)
FILTERS = ("too_short", "unfinished", "repetition")


def drop_lines(text: str, fraction: float, rng) -> str:
    """`text` with about `fraction` of its paragraphs (one paragraph: its sentences) left
    out at random, at least one kept: the Extender's training input, a shorter source
    for the text it learns to write."""
    parts = paragraphs(text)
    joiner = "\n\n"
    if len(parts) <= 1:
        parts, joiner = [s for s in _SENTENCE_BREAK.split(text.strip()) if s], " "
    if len(parts) <= 1:
        return text.strip()
    keep = rng.random(len(parts)) >= fraction
    if not keep.any():
        keep[rng.integers(len(parts))] = True
    return joiner.join(p for p, k in zip(parts, keep, strict=True) if k)


def rank_kept(lengths, rng) -> np.ndarray:
    """bool [n]: which samples stay when the shortest are dropped with probability
    1 - 2·rank³ (rank 0 for the shortest, 1 for the longest; ties by order)."""
    n = len(lengths)
    if n <= 1:
        return np.ones(n, bool)
    rank = np.empty(n)
    rank[np.argsort(lengths, kind="stable")] = np.arange(n) / (n - 1)
    return rng.random(n) < 2 * rank**3


def read_instructions(path: str) -> list[dict]:
    """Every line of a JSONL file of {"instruction"[, "required_words"]} (blank lines
    skipped); `required_words` (a positive number) is scored with `sl_score`."""
    if not path or not os.path.isfile(path):
        raise UserError(f'self_lengthen.instructions={path!r}: a JSONL file of {{"instruction"}}')
    out = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            ok = isinstance(row, dict) and isinstance(row.get("instruction"), str)
            required = row.get("required_words") if ok else None
            if (
                not ok
                or not row["instruction"].strip()
                or not (required is None or (isinstance(required, (int, float)) and required > 0))
            ):
                raise UserError(
                    f'{path}:{number}: needs a non-empty string "instruction" and, if '
                    'given, a positive "required_words"'
                )
            out.append({"instruction": row["instruction"], "required_words": required})
    if not out:
        raise UserError(f"self_lengthen.instructions={path!r} holds no instruction")
    return out


class Writer:
    """A role's model and tokenizer, writing assistant turns through one `lcx.generate`
    Engine (compiled once for all of a round's calls; continuous batching over the
    long, ragged outputs)."""

    def __init__(self, model, tokenizer, settings):
        from lcx.generate import Engine

        self.tokenizer, self.settings = tokenizer, settings  # SelfLengthenSettings
        # Room for a prompt holding half a response plus a prefill, and the new tokens.
        longest = 3 * settings.max_new_tokens + 512
        self.engine = Engine(
            model,
            slots=settings.slots,
            max_length=-(-longest // 8) * 8,
            token_budget=max(256, settings.slots + 1),
        )

    def chat(self, prompts: list[str], prefills: list[str] | None = None, *, seed: int):
        """Sampled assistant turns (text) for user `prompts`, after `prefills` if given."""
        from lcx.data.sft import turn_stop_ids
        from lcx.data.tokenizer import text_ids
        from lcx.generate import Request, SamplingParams
        from lcx.generate.api import request_seed

        sl, tok = self.settings, self.tokenizer
        stop = turn_stop_ids(tok)  # EOS and the template's end of turn
        ids = []
        for i, prompt in enumerate(prompts):
            user = [{"role": "user", "content": prompt}]
            head = list(tok.apply_chat_template(user, add_generation_prompt=True))
            prompt_ids = head + (text_ids(tok, prefills[i]) if prefills else [])
            sampling = SamplingParams(sl.temperature, seed=request_seed(seed, i))
            ids.append(self.engine.submit(Request(prompt_ids, sl.max_new_tokens, sampling, stop)))
        results = self.engine.run()
        return [tok.decode(results[i]).decode("utf-8", "replace") for i in ids]


def _writer(settings, directory: str) -> Writer:
    """A Writer for the model of a Hugging Face directory, with the run's tokenizer."""
    from lcx.checkpoints import load_hf
    from lcx.train.model_source import tokenizer_of

    model = load_hf(directory, param_dtype=settings.model.param_dtype)
    return Writer(model, tokenizer_of(settings), settings.self_lengthen)


def generator_statistics(texts: list[str], required=None) -> dict:
    """Length (words) mean and p90, the share of texts repeating a 13-gram, and where
    `required` (words per text, None where not asked) is given, LongBench-Write's mean S_l."""
    lengths = [word_count(t) for t in texts]
    spread = length_spread(lengths)
    out = {
        "responses": len(texts),
        "mean_words": spread["mean"],
        "p90_words": spread["p90"],
        "repeated_13gram_rate": float(np.mean([repeats_ngram(t) for t in texts])),
    }
    pairs = [(r, n) for r, n in zip(required or [], lengths, strict=False) if r]
    if pairs:
        out["mean_sl_score"] = float(np.mean([sl_score(r, n) for r, n in pairs]))
    return out


def lengthen_round(settings, generator_dir: str, extender_dir: str, instructions, k: int):
    """(accepted samples, summary) of round k: the Generator's responses, extended."""
    sl = settings.self_lengthen
    rng = np.random.default_rng([sl.seed, k])
    writer = _writer(settings, generator_dir)
    wanted = [i for i in instructions for _ in range(sl.samples)]
    asked = [i["instruction"] for i in wanted]
    sources = [t.strip() for t in writer.chat(asked, seed=sl.seed * 1000 + k)]
    required = [i["required_words"] for i in wanted]
    summary = {"round": k, "generator": generator_statistics(sources, required)}
    extender = _writer(settings, extender_dir) if extender_dir != generator_dir else writer
    rejected = dict.fromkeys(FILTERS, 0)
    # An empty response has no first half to extend (and any extension is 1.2x of 0).
    waiting = [i for i, text in enumerate(sources) if word_count(text)]
    accepted, empty = {}, len(sources) - len(waiting)
    for attempt in range(sl.retries):
        if not waiting:
            break
        prompts = [
            ENRICH_PROMPT.format(instruction=asked[i], text=first_half(sources[i])) for i in waiting
        ]
        seed = sl.seed * 1000 + k * 100 + attempt
        rewrites = [t.strip() for t in extender.chat(prompts, seed=seed)]
        kept = [leading_fraction(r, sl.keep) for r in rewrites]
        endings = extender.chat(prompts, kept, seed=seed + 50)
        still = []
        for i, head, tail in zip(waiting, kept, endings, strict=True):
            response = (head + tail).strip()  # the continuation's own spacing
            failed = check_extension(sources[i], response, min_ratio=sl.min_ratio)
            for name in failed:
                rejected[name] += 1
            if failed:
                still.append(i)
            else:
                accepted[i] = response
        waiting = still
    order = sorted(accepted)
    lengths = [word_count(accepted[i]) for i in order]
    keep = rank_kept(lengths, rng) if sl.rank_drop else np.ones(len(order), bool)
    tokenizer = writer.tokenizer
    samples = [
        {
            "instruction": asked[i],
            "source": sources[i],
            "response": accepted[i],
            "source_tokens": len(_ids(tokenizer, sources[i])),
            "response_tokens": len(_ids(tokenizer, accepted[i])),
        }
        for i, kept_it in zip(order, keep, strict=True)
        if kept_it
    ]
    summary.update(
        sources=len(sources),
        empty_sources=empty,
        accepted=len(accepted),
        gave_up=len(waiting),
        rejected=rejected,
        dropped_by_rank=int(len(order) - keep.sum()),
        kept=len(samples),
    )
    return samples, summary


def _ids(tokenizer, text: str) -> list[int]:
    from lcx.data.tokenizer import text_ids

    return text_ids(tokenizer, text)


def training_conversations(samples, role: str, drop: float, rng) -> list[dict]:
    """A role's fine-tuning conversations from a round's accepted samples."""
    out = []
    for s in samples:
        if role == "generator":
            prompt = s["instruction"]
        else:
            shorter = drop_lines(s["source"], drop, rng)
            prompt = ENRICH_PROMPT.format(instruction=s["instruction"], text=shorter)
        turns = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": s["response"]},
        ]
        out.append({"messages": turns})
    return out


def _write_jsonl(path: str, rows) -> None:
    """`rows` as JSONL, written under a temporary name and renamed into place."""
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def finetune_role(settings, directory: str, start: str, conversations_path: str) -> str:
    """Fine-tune the model in `start` (a Hugging Face directory) on a JSONL of
    conversations in `directory` (resuming); its export, `directory`/hf. With
    `self_lengthen.epochs` > 0 the run takes as many steps as that many passes over the
    conversations' tokens need (the paper: 4), else `finetune`'s `train.steps`."""
    from lcx.settings import as_dict, merged, resolve
    from lcx.train import train_and_evaluate
    from lcx.train.model_source import tokenizer_of
    from lcx.train.restore import export_workdir

    hf = os.path.join(directory, "hf")
    if os.path.exists(os.path.join(hf, "config.json")):
        return hf
    base = as_dict(settings)
    base.update(mode="train")
    base["init"]["hf_checkpoint"] = start
    sl = settings.self_lengthen
    if sl.epochs > 0:  # steps for that many passes over the round's tokens, rows packed
        with open(conversations_path) as f:
            messages = [json.loads(line)["messages"] for line in f if line.strip()]
        tokenizer = tokenizer_of(settings)
        tokens = sum(len(tokenizer.apply_chat_template(m)) for m in messages)
        train = merged(base, dict(sl.finetune), "self_lengthen.finetune")["train"]
        rows = tokens / train["seq_len"]
        base["train"]["steps"] = max(1, math.ceil(sl.epochs * rows / train["batch_size"]))
    base["data"].update(
        format="chat", paths=conversations_path, eval_paths=conversations_path, sources=[]
    )
    overrides = {k: dict(v) for k, v in sl.finetune.items()}
    if sl.epochs > 0:
        overrides.get("train", {}).pop("steps", None)
    values = merged(base, overrides, "self_lengthen.finetune")
    role = resolve(values)
    train_and_evaluate(role, directory)
    partial = hf + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    export_workdir(role, directory, partial)
    os.replace(partial, hf)
    return hf


def run_self_lengthen(config, workdir: str) -> dict:
    """Every round of `config.self_lengthen` (resuming a killed run); the rounds'
    summaries and the final Generator's statistics."""
    from lcx.settings import resolve

    settings, workdir = resolve(config), os.path.abspath(workdir)
    sl = settings.self_lengthen
    start = settings.init.hf_checkpoint
    if not start:
        raise UserError(
            "mode=self_lengthen needs init.hf_checkpoint: the model both roles start from"
        )
    instructions = read_instructions(sl.instructions)
    out = os.path.join(workdir, "self_lengthen")
    os.makedirs(out, exist_ok=True)
    generator = extender = start
    summaries = []
    for k in range(1, sl.rounds + 1):
        summary_path = os.path.join(out, f"round_{k}.summary.json")
        samples_path = os.path.join(out, f"round_{k}.jsonl")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            with open(samples_path) as f:
                samples = [json.loads(line) for line in f if line.strip()]
        else:
            samples, summary = lengthen_round(settings, generator, extender, instructions, k)
            _write_jsonl(samples_path, samples)
            with open(summary_path + ".tmp", "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(summary_path + ".tmp", summary_path)
        summaries.append(summary)
        if not samples:  # nothing passed the filters: the roles stay as they were
            print(f"lcx: self_lengthen round {k}: no extension accepted ({summary['rejected']})")
            continue
        rng = np.random.default_rng([sl.seed, k, 1])
        models = {}
        for role, current in (("generator", generator), ("extender", extender)):
            where = os.path.join(out, f"round_{k}", role)
            os.makedirs(where, exist_ok=True)
            data = os.path.join(where, "conversations.jsonl")
            if not os.path.exists(data):
                _write_jsonl(data, training_conversations(samples, role, sl.drop_lines, rng))
            models[role] = finetune_role(settings, where, current, data)
        generator, extender = models["generator"], models["extender"]
    final_path = os.path.join(out, "final.summary.json")
    if os.path.exists(final_path):
        with open(final_path) as f:
            final = json.load(f)
    else:
        writer = _writer(settings, generator)
        wanted = [i for i in instructions for _ in range(sl.samples)]
        texts = writer.chat([i["instruction"] for i in wanted], seed=sl.seed * 1000 + 999)
        final = {"generator": generator_statistics(texts, [i["required_words"] for i in wanted])}
        with open(final_path + ".tmp", "w") as f:
            json.dump(final, f, indent=1)
        os.replace(final_path + ".tmp", final_path)
    return {"rounds": summaries, "final": final, "generator": generator, "extender": extender}
