"""Length-following evaluation (lcx.evals.length_following): the instruction set, the
report's arithmetic on known responses, prompts with and without a chat template, the
token budget, and mode=evaluate end to end (integration)."""

import json

import numpy as np
import pytest

from lcx.data import ByteTokenizer
from lcx.data.tokenizer import prompt_ids, text_ids
from lcx.errors import UserError
from lcx.evals.length import (
    length_spread,
    longen_window,
    range_score,
    repeats_ngram,
    sl_score,
    word_count,
)
from lcx.evals.length_following import (
    evaluate_length_following,
    instruction_prompt,
    length_report,
    new_token_budget,
    parse_words,
    tokens_per_word,
)
from lcx.evals.length_instructions import (
    KINDS,
    PHRASES,
    LengthInstruction,
    builtin_instructions,
    read_instructions,
)
from lcx.train import run_record

WORDS = (50, 100, 200, 400, 800)


def test_builtin_set_is_deterministic_and_asks_every_length_in_every_window(rng):
    seed = int(rng.integers(1 << 20))
    first = builtin_instructions(WORDS, seed)
    assert first == builtin_instructions(WORDS, seed)
    assert first != builtin_instructions(WORDS, seed + 1)  # topics and forms drawn
    assert len(first) == 3 * len(WORDS)
    assert sorted((i.required_words, i.kind) for i in first) == sorted(
        (n, k) for n in WORDS for k in KINDS
    )
    assert len({i.instruction for i in first}) == len(first)
    for ins in first:
        assert f" {PHRASES[ins.kind]} {ins.required_words} words." in ins.instruction
        assert ins.window == pytest.approx(longen_window(ins.required_words, ins.kind))
    assert {i.kind for i in builtin_instructions([50], seed)} == set(KINDS)
    with pytest.raises(ValueError, match=r"words=\[0\]"):
        builtin_instructions([0], seed)


def test_a_users_instruction_file_and_its_errors(tmp_path):
    path = tmp_path / "asks.jsonl"
    rows = [
        {"instruction": "Write 30 words on tea.", "required_words": 30},
        {"instruction": "Write at most 90 words on rain.", "required_words": 90, "kind": "below"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_instructions(str(path)) == [
        LengthInstruction("Write 30 words on tea.", 30, "about"),
        LengthInstruction("Write at most 90 words on rain.", 90, "below"),
    ]
    bad = [
        ('{"instruction": "x", "required_words": 0}', r"required_words=0"),
        ('{"instruction": "x", "required_words": 5, "kind": "near"}', r"kind='near'; valid"),
        ('{"instruction": "x"}', r"needs instruction and required_words"),
        ('{"instruction": "x", "required_words": 5, "id": 1}', r"nothing else"),
        ("not json", r"Expecting value"),
    ]
    for line, message in bad:
        path.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(UserError, match=rf"^evals.length.file: {path}:2: .*{message}"):
            read_instructions(str(path))
    with pytest.raises(UserError, match=r"is not a file"):
        read_instructions(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match=r"evals.length.words='50,x'"):
        parse_words("50,x")
    assert parse_words("50, 100,") == [50, 100]


def _text(words: int, offset: int = 0) -> str:
    """`words` distinct words (no n-gram repeats)."""
    return " ".join(f"w{offset + k}" for k in range(words)) + "."


class ScriptedSampler:
    """Answers each prompt with the next of its scripted texts; records what it got."""

    def __init__(self, tokenizer, script, *, stop=None):
        self.tokenizer, self.script, self.stop = tokenizer, script, stop
        self.calls = []

    def __call__(self, prompts, max_new_tokens):
        self.calls.append((prompts, max_new_tokens))
        out = []
        for prompt in prompts:
            text = self.script[self.tokenizer.decode(prompt).decode()].pop(0)
            ids = text_ids(self.tokenizer, text)[:max_new_tokens]
            out.append(ids + [self.stop] if self.stop is not None and text else ids)
        return out


def test_report_arithmetic_on_known_responses():
    tokenizer = ByteTokenizer()
    asks = [
        LengthInstruction("Write about 10 words.", 10),
        LengthInstruction("At least 40.", 40, "above"),
    ]
    lengths = [[10, 14, 6], [40, 80, 20]]
    script = {
        f"{asks[0].instruction}\n": [_text(n) for n in lengths[0]],
        f"{asks[1].instruction}\n": [_text(lengths[1][0]), _text(30) + " " + _text(30), _text(20)],
    }
    lengths[1][1] = word_count(script[f"{asks[1].instruction}\n"][1])  # 60 words, repeating
    sampler = ScriptedSampler(tokenizer, script, stop=tokenizer.eos_id)
    report = evaluate_length_following(
        sampler, tokenizer, asks, samples=3, context=4096, stop_ids=(tokenizer.eos_id,)
    )
    ((prompts, budget),) = sampler.calls
    assert prompts == [prompt_ids(tokenizer, a.instruction + "\n") for a in asks for _ in range(3)]
    assert (
        budget == report["max_new_tokens"] == new_token_budget(tokenizer, 40, len(prompts[0]), 4096)
    )
    sl = [[sl_score(a.required_words, n) for n in ns] for a, ns in zip(asks, lengths, strict=True)]
    rs = [[range_score(n, *a.window) for n in ns] for a, ns in zip(asks, lengths, strict=True)]
    assert report["sl_score"] == pytest.approx(np.mean(sl))
    assert report["range_score"] == pytest.approx(np.mean(rs))
    assert report["repeated_13gram_rate"] == pytest.approx(1 / 6)
    assert report["truncated_rate"] == 0 and report["chat"] is False
    assert report["words"] == length_spread(sum(lengths, []))
    for row, a, ns, s, r in zip(report["prompts"], asks, lengths, sl, rs, strict=True):
        assert row["instruction"] == a.instruction and row["kind"] == a.kind
        assert row["words"] == length_spread(ns)  # mean, std, p90 over the k samples
        assert row["sl_score"] == pytest.approx(np.mean(s))
        assert row["range_score"] == pytest.approx(np.mean(r))
        assert row["window"] == pytest.approx(list(a.window))
    assert [b["required_words"] for b in report["by_required"]] == [10, 40]
    assert report["by_required"][1]["sl_score"] == report["prompts"][1]["sl_score"]
    json.dumps(report)  # a JSON line of WORKDIR/evals.jsonl
    with pytest.raises(ValueError, match=r"expected samples=2 per instruction"):
        length_report(asks, ["a"] * 3, 2)


def test_a_response_cut_by_the_budget_counts_as_truncated():
    tokenizer = ByteTokenizer()
    asks = [LengthInstruction("Say 3 words.", 3)]
    script = {"Say 3 words.\n": [_text(3), _text(50)]}
    sampler = ScriptedSampler(tokenizer, script)  # never a stop token
    report = evaluate_length_following(
        sampler, tokenizer, asks, samples=2, context=512, max_new_tokens=40, stop_ids=(257,)
    )
    assert report["max_new_tokens"] == 40 and report["truncated_rate"] == 0.5
    assert report["prompts"][0]["words"]["n"] == 2


class ChatTokenizer:
    """A byte tokenizer with a chat template: '<user>' content '<bot>' as bytes."""

    def __init__(self):
        self.inner, self.calls = ByteTokenizer(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        self.calls.append((messages, add_generation_prompt))
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return [self.bos_id, *text.encode(), *(b"<bot>" if add_generation_prompt else b"")]


def test_chat_runs_are_prompted_through_the_template():
    tokenizer = ChatTokenizer()
    ids = instruction_prompt(tokenizer, "Write 5 words.", chat=True)
    assert tokenizer.calls == [([{"role": "user", "content": "Write 5 words."}], True)]
    assert tokenizer.decode(ids) == b"<user>Write 5 words.<bot>"
    assert instruction_prompt(tokenizer, "Write 5 words.", chat=False) == prompt_ids(
        tokenizer.inner, "Write 5 words.\n"
    )
    script = {"<user>Write 5 words.<bot>": [_text(5)]}
    report = evaluate_length_following(
        ScriptedSampler(tokenizer, script, stop=tokenizer.eos_id),
        tokenizer,
        [LengthInstruction("Write 5 words.", 5)],
        samples=1,
        context=256,
        chat=True,
        stop_ids=(tokenizer.eos_id,),
    )
    assert report["chat"] is True and report["sl_score"] == 100 and report["range_score"] == 1


def test_the_budget_covers_the_longest_requirement_within_the_context():
    tokenizer = ByteTokenizer()
    per_word = tokens_per_word(tokenizer)
    assert 4 < per_word < 8  # English prose in bytes
    need = int(np.ceil(per_word * 100))
    assert new_token_budget(tokenizer, 100, 50, 8192) == int(np.ceil(2 * need))
    assert new_token_budget(tokenizer, 100, 50, need + 60) == need + 10  # what is left
    assert new_token_budget(tokenizer, 100, 50, 8192, max_new_tokens=77) == 77
    with pytest.raises(UserError, match=r"takes about \d+ tokens, but evals.context=300"):
        new_token_budget(tokenizer, 100, 50, 300)
    with pytest.raises(UserError, match=r"evals.length.max_new_tokens=900: .* leaves 250"):
        new_token_budget(tokenizer, 100, 50, 300, max_new_tokens=900)


def test_repeats_ngram_lives_in_evals_and_self_lengthen_uses_it():
    from lcx.posttrain import self_lengthen

    assert self_lengthen.repeats_ngram is repeats_ngram
    assert not repeats_ngram(_text(20)) and repeats_ngram(_text(13) + " " + _text(13))


def test_older_runs_without_the_length_keys_still_resume(smoke_config):
    recorded = {
        k: v
        for k, v in run_record.flatten(smoke_config).items()
        if not k.startswith("evals.length.")
    }
    assert run_record.differences(recorded, smoke_config) == {}


@pytest.mark.integration
def test_evaluate_mode_reports_length_following(smoke_config, tmp_path, capsys):
    from lcx.modes import run

    c = smoke_config
    run(c, str(tmp_path))
    c.mode = "evaluate"
    c.evals.update(tasks="", loss_by_position=False, context=256)
    c.evals.length.update(enabled=True, words="4,8", samples=2, max_new_tokens=24)
    result = run(c, str(tmp_path))
    assert result["records"] == 1
    (record,) = [json.loads(x) for x in open(tmp_path / "evals.jsonl")]
    assert record["task"] == "length_following" and record["instructions"] == 6
    assert record["max_new_tokens"] == 24 and 0 <= record["sl_score"] <= 100
    assert all(p["words"]["n"] == 2 for p in record["prompts"])
    assert "length following (6 instructions x 2 samples" in capsys.readouterr().out
