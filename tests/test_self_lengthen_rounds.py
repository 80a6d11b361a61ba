"""Self-Lengthen's rounds (issue 28 item 6): the round logic with scripted writers, the
files each round leaves, a killed run restarting in its round, and the committed data
being its scripts' output. The real models run in notebooks/09_post_training.ipynb."""

import json
import os
import sys

import numpy as np
import pytest

from lcx.data import ByteTokenizer
from lcx.errors import UserError
from lcx.evals.length import word_count
from lcx.posttrain import self_lengthen as sl
from lcx.settings import resolve
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_lengthen_data  # noqa: E402
import make_task_conversations  # noqa: E402


def test_drop_lines_keeps_order_and_at_least_one(rng):
    text = "\n\n".join(f"Paragraph {i} ends here." for i in range(10))
    for _ in range(20):
        shorter = sl.drop_lines(text, 0.2, rng)
        kept = sl.paragraphs(shorter)
        assert 1 <= len(kept) <= 10
        assert kept == sorted(kept, key=lambda p: int(p.split()[1]))
    assert sl.drop_lines("One sentence only.", 0.9, rng) == "One sentence only."
    one = sl.drop_lines("A b. C d. E f. G h.", 0.99, rng)
    assert 1 <= len(one.split(". ")) <= 4


def test_rank_drop_keeps_the_longest_and_drops_the_shortest(rng):
    lengths = [50, 10, 30, 90, 70]
    for _ in range(50):
        kept = sl.rank_kept(lengths, rng)
        assert kept[3] and not kept[1]  # 2 * 1^3 >= 1 > u; 2 * 0^3 = 0
    # Rank 0.5 stays with probability 2 * 0.5^3 = 1/4.
    share = np.mean([sl.rank_kept([1, 2, 3], rng)[1] for _ in range(4000)])
    assert abs(share - 0.25) < 0.03


def test_instructions_file(tmp_path):
    good = tmp_path / "i.jsonl"
    good.write_text('{"instruction": "Write."}\n\n{"instruction": "More.", "required_words": 40}\n')
    assert sl.read_instructions(str(good)) == [
        {"instruction": "Write.", "required_words": None},
        {"instruction": "More.", "required_words": 40},
    ]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "Write."}\n{"instruction": "x", "required_words": -1}\n')
    with pytest.raises(UserError, match="b.jsonl:2: needs"):
        sl.read_instructions(str(bad))
    with pytest.raises(UserError, match="self_lengthen.instructions"):
        sl.read_instructions("")


class ScriptedWriter:
    """A role that writes by rule: the Generator `words` words in sentences of 5; the
    Extender, asked to enrich, writes its half with a sentence after each sentence, and
    asked to continue, adds six sentences (the first attempt of every third source ends
    unfinished)."""

    calls = []

    def __init__(self, directory):
        self.directory, self.tokenizer = directory, ByteTokenizer()

    def chat(self, prompts, prefills=None, *, seed):
        ScriptedWriter.calls.append((self.directory, len(prompts), prefills is not None))
        rng = np.random.default_rng(seed)
        out = []
        for i, prompt in enumerate(prompts):
            if "Rewrite that part" not in prompt:
                n = 2 + int(rng.integers(3))
                out.append("\n\n".join(f"Topic {i} sentence {j} is here now." for j in range(n)))
            elif prefills is None:
                half = prompt.split("Response so far:\n", 1)[1]
                out.append("\n\n".join(f"{p}\n\nAnd more about it." for p in sl.paragraphs(half)))
            else:
                tail = "".join(f"\n\nClosing sentence {j} for {i} at {seed}." for j in range(6))
                out.append(tail + (" unfinished" if i % 3 == 0 and seed % 100 == 50 else ""))
        return out


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    ScriptedWriter.calls = []
    monkeypatch.setattr(sl, "_writer", lambda settings, directory: ScriptedWriter(directory))
    tuned = []

    def finetune(settings, directory, start, data):
        with open(data) as f:
            conversations = [json.loads(line) for line in f]
        tuned.append((os.path.relpath(directory, tmp_path), start, len(conversations)))
        return os.path.join(directory, "hf")

    monkeypatch.setattr(sl, "finetune_role", finetune)
    instructions = tmp_path / "instructions.jsonl"
    rows = [{"instruction": f"Write {i}.", "required_words": 20} for i in range(6)]
    instructions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from configs.lm_tiny import get_config

    config = get_config("smoke")
    config.init.hf_checkpoint = "START"
    config.self_lengthen.update(instructions=str(instructions), rounds=2, samples=2, retries=2)
    return resolve(config), tuned


def test_rounds_write_their_files_and_fine_tune_both_roles(scripted, tmp_path):
    settings, tuned = scripted
    result = sl.run_self_lengthen(settings, str(tmp_path))
    out = tmp_path / "self_lengthen"
    for k in (1, 2):
        summary = json.loads((out / f"round_{k}.summary.json").read_text())
        samples = [json.loads(x) for x in (out / f"round_{k}.jsonl").read_text().splitlines()]
        assert summary["sources"] == 12 and summary["kept"] == len(samples) > 0
        assert summary["accepted"] + summary["gave_up"] + summary["empty_sources"] == 12
        assert summary["rejected"]["unfinished"] >= 1  # the scripted unfinished first tries
        assert summary["kept"] + summary["dropped_by_rank"] == summary["accepted"]
        assert set(summary["generator"]) >= {"mean_words", "p90_words", "repeated_13gram_rate"}
        assert "mean_sl_score" in summary["generator"]
        for s in samples:
            assert set(s) == {
                "instruction",
                "source",
                "response",
                "source_tokens",
                "response_tokens",
            }
            assert word_count(s["response"]) >= 1.2 * word_count(s["source"])
            assert sl.check_extension(s["source"], s["response"]) == []
            assert s["response_tokens"] > s["source_tokens"]
    # Round k's roles start from round k-1's; the Extender learns from shortened sources.
    assert [t[:2] for t in tuned] == [
        ("self_lengthen/round_1/generator", "START"),
        ("self_lengthen/round_1/extender", "START"),
        ("self_lengthen/round_2/generator", str(out / "round_1/generator/hf")),
        ("self_lengthen/round_2/extender", str(out / "round_1/extender/hf")),
    ]
    extender = (out / "round_1/extender/conversations.jsonl").read_text().splitlines()
    assert all("Rewrite that part" in json.loads(x)["messages"][0]["content"] for x in extender)
    assert result["generator"] == str(out / "round_2/generator/hf")
    assert result["final"]["generator"]["responses"] == 12


def test_a_killed_run_restarts_in_the_round_it_was_in(scripted, tmp_path, monkeypatch):
    settings, tuned = scripted
    real = sl.finetune_role

    def killed_in_round_2(settings, directory, start, data):
        if "round_2" in directory:
            raise KeyboardInterrupt
        return real(settings, directory, start, data)

    monkeypatch.setattr(sl, "finetune_role", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        sl.run_self_lengthen(settings, str(tmp_path))
    first = list(ScriptedWriter.calls)
    monkeypatch.setattr(sl, "finetune_role", real)
    ScriptedWriter.calls = []
    sl.run_self_lengthen(settings, str(tmp_path))
    # Rounds 1 and 2 were generated before the kill: only the final statistics now.
    assert len(ScriptedWriter.calls) == 1 and len(first) > 2
    assert [t[0] for t in tuned[-2:]] == [
        "self_lengthen/round_2/generator",
        "self_lengthen/round_2/extender",
    ]


def test_committed_data_is_the_scripts_output():
    def lines(path):
        with open(os.path.join(ROOT, "configs", "data", path)) as f:
            return [json.loads(x) for x in f]

    assert lines("lengthen_seed.jsonl") == make_lengthen_data.seed_conversations()
    assert lines("lengthen_instructions.jsonl") == make_lengthen_data.instructions()
    assert lines("task_conversations.jsonl") == make_task_conversations.conversations()
