"""Long-context evaluation: deterministic, length-exact tasks; exact scorers; oracle 100%,
a random model at chance; over-long prompts refused; loss by position; mode=evaluate."""

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from flax import nnx

from lcx.data import ByteTokenizer, HFTokenizer, stdlib_documents
from lcx.evals import (
    TASKS,
    TAUGHT_TASKS,
    TransformerLM,
    loss_by_position,
    make_examples,
    plot_loss_by_position,
    prompt_length,
    score_examples,
    split_ids,
)
from lcx.evals.cli import parse_settings
from lcx.evals.scoring import continuation, string_match_all, text_ids
from lcx.model import Transformer, TransformerConfig
from tests.test_tokenizers import _train_bpe


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    docs = stdlib_documents()[::40]
    texts = [open(d.path, "rb").read().decode("utf-8", "replace") for d in docs]
    return HFTokenizer(_train_bpe(str(tmp_path_factory.mktemp("bpe")), texts))


def test_tasks_are_deterministic_per_seed(rng):
    seed = int(rng.integers(1 << 20))
    for task in TASKS:
        first = make_examples(task, 512, 2, seed, ByteTokenizer())
        assert first == make_examples(task, 512, 2, seed, ByteTokenizer())
        assert first != make_examples(task, 512, 2, seed + 1, ByteTokenizer())
        assert first[0] != first[1]


@pytest.mark.parametrize("tokenizer_name", ["bytes", "bpe"])
def test_prompts_are_the_requested_length(tokenizer_name, bpe, rng):
    tokenizer = ByteTokenizer() if tokenizer_name == "bytes" else bpe
    seed = int(rng.integers(1 << 20))
    for task in TASKS:
        for length in (1024, 3000):
            (example,) = make_examples(task, length, 1, seed, tokenizer)
            n = prompt_length(tokenizer, example.prompt)
            assert abs(n - length) <= 0.01 * length, (task, length, n)
            assert n <= length
    if tokenizer_name == "bytes":  # a long prompt, as lengths reach 128K
        (example,) = make_examples("variable_tracking", 32_768, 1, seed, tokenizer)
        assert 32_768 - 2 <= prompt_length(tokenizer, example.prompt) <= 32_768


RULER_TASKS = (
    "niah_single",
    "niah_multikey",
    "ruler_variable_tracking",
    "common_words",
    "frequent_words",
)


def _solve_ruler(prompt: str) -> str | None:
    """The answer of a RULER task's prompt read off the prompt; None for other tasks."""
    if prompt.endswith("mentioned in the provided text?\nAnswer:"):
        key = re.search(r"special magic number for (\S+) mentioned", prompt).group(1)
        return re.search(rf"magic numbers for {key} is: (\d+)\.", prompt).group(1)
    if "Find all variables that are assigned the value" in prompt:
        bound = [re.search(r"assigned the value (\d+) ", prompt).group(1)]
        for name, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", prompt):
            if source in bound:
                bound.append(name)
        return " ".join(bound[1:])
    if "most common words in the list?" in prompt:
        entries = re.findall(r"\d+\. ([a-z]+)", prompt)
        k = int(re.search(r"What are the (\d+) most common", prompt).group(1))
        common = {w for w, _ in Counter(entries).most_common(k)}
        return ", ".join(dict.fromkeys(w for w in entries if w in common))
    if "most frequent coded words" in prompt:
        k = int(re.search(r"What are the (\d+) most frequent", prompt).group(1))
        return ", ".join(w for w, _ in Counter(prompt.split("\n")[1].split()).most_common(k))
    return None


def _solve(prompt: str) -> str:
    """The answer of a task prompt, read off the prompt (what the oracle 'copies')."""
    if (answer := _solve_ruler(prompt)) is not None:
        return answer
    if prompt.endswith("Value:"):
        key = re.findall(r'Key: "(\w+)"', prompt)[-1]
        return re.search(rf'"{key}": "(\w+)"', prompt).group(1)
    if "magic numbers for" in prompt:
        names = re.search(r"magic numbers for (.*)\?", prompt).group(1).split(", ")
        return ", ".join(
            re.search(rf"magic number for {n} is (\d+)\.", prompt).group(1) for n in names
        )
    if "hold the value" in prompt:
        value = re.search(r"hold the value (\d+)\?", prompt).group(1)
        bound = []
        for name, source in re.findall(r"VAR (\w+) = (\w+)", prompt):
            if source == value or source in bound:
                bound.append(name)
        return " ".join(bound)
    if prompt.endswith("Text:"):
        return re.search(r"\[SPAN\] (.*?) \[/SPAN\]", prompt).group(1)
    shots = re.findall(r"Input: (.*)\nLabel: (.*)\n", prompt)
    query = prompt.rsplit("Input: ", 1)[1].split("\n")[0].split()
    seen = {}
    for text, label in shots:
        for word in text.split():
            seen.setdefault(word, []).append(label)
    clues = [seen[w] for w in query if w in seen and len(set(seen[w])) == 1]
    return max(clues, key=len)[0]  # a class's clue word: always with its label, often


class OracleLM:
    """Answers by reading the prompt; `wrong`: a one-character-wrong answer."""

    context = 1 << 16

    def __init__(self, tokenizer, wrong=False):
        self.tokenizer, self.wrong = tokenizer, wrong

    def _answer(self, prompt):
        answer = _solve(prompt)
        if not self.wrong:
            return answer
        labels = sorted(set(re.findall(r"Label: (.*)\n", prompt)) - {answer})
        if labels:  # classification: another of the label words
            return labels[0]
        return answer[:-1] + ("x" if answer[-1].lower() != "x" else "y")

    def _text(self, ids):
        return self.tokenizer.decode(ids).decode("utf-8")

    def generate(self, prompts, max_new_tokens):
        return [
            text_ids(self.tokenizer, continuation(self._answer(self._text(p)))) for p in prompts
        ]

    def score_tokens(self, sequences):
        out = []
        for seq in sequences:
            prompt = self._text(seq).rsplit(":", 1)[0] + ":"
            head, tail = split_ids(self.tokenizer, prompt, self._answer(prompt))
            expected = np.asarray((head + tail + [-1] * len(seq))[: len(seq)])
            match = expected[1:] == np.asarray(seq[1:])
            out.append((np.where(match, 0.0, -30.0), match))
        return out


@pytest.mark.parametrize("tokenizer_name", ["bytes", "bpe"])
def test_an_oracle_scores_everything_and_a_wrong_one_nothing(tokenizer_name, bpe, rng):
    tokenizer = ByteTokenizer() if tokenizer_name == "bytes" else bpe
    seed = int(rng.integers(1 << 20))
    for task in TASKS:
        examples = make_examples(task, 2048, 3, seed, tokenizer)
        right = score_examples(OracleLM(tokenizer), tokenizer, examples)
        assert right["exact_match"] == 1.0 and right["answer_token_accuracy"] == 1.0, task
        assert right["answer_logprob"] == 0.0
        assert right.get("choice_accuracy", 1.0) == 1.0 and right["string_match_all"] == 1.0
        wrong = score_examples(OracleLM(tokenizer, wrong=True), tokenizer, examples)
        assert wrong["exact_match"] == 0.0 and wrong["answer_token_accuracy"] < 1.0, task
        assert wrong["string_match_all"] < 1.0, task
        assert wrong.get("choice_accuracy", 0.0) == 0.0


def _check_ruler_example(example):
    """The RULER task's answer holds by construction, independently of `_solve_ruler`."""
    prompt, targets = example.prompt, example.targets
    if example.task.startswith("niah"):
        needles = re.findall(r"magic numbers for (\S+) is: (\d{7})\.", prompt)
        keys, numbers = zip(*needles, strict=True)
        assert len(set(keys)) == len(keys) and len(set(numbers)) == len(numbers)
        assert len(needles) == 1 if example.task == "niah_single" else 2 <= len(needles) <= 4
        assert targets == (example.answer,) and prompt.count(example.answer) == 1
    elif example.task == "ruler_variable_tracking":
        value = re.search(r"assigned the value (\d+) ", prompt).group(1)
        links = [f"VAR {targets[0]} = {value}"]
        links += [f"VAR {b} = VAR {a}" for a, b in zip(targets, targets[1:], strict=False)]
        spots = [prompt.index(link + "\n") for link in links]
        assert len(targets) == 5 and spots == sorted(spots) and prompt.count("VAR ") == 9
    elif example.task == "common_words":
        numbered = re.findall(r"(\d+)\. ([a-z]+)", prompt)
        assert [int(i) for i, _ in numbered] == list(range(1, len(numbered) + 1))
        counts = Counter(w for _, w in numbered)
        rest = [c for w, c in counts.items() if w not in targets] or [0]
        assert min(counts[w] for w in targets) > max(rest)
        assert f"the {len(targets)} most common" in prompt and len(targets) >= 3
    else:
        counts = Counter(prompt.split("\n")[1].split())
        ranked = [counts[w] for w in targets]
        rest = [c for w, c in counts.items() if w not in targets]
        assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == 3
        assert ranked[-1] > max(rest)


@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_tasks_are_exact_deterministic_and_answerable(task, rng):
    tokenizer = ByteTokenizer()
    for seed in rng.integers(1 << 20, size=2):
        for length in (240, 256, 512):
            (example,) = make_examples(task, length, 1, int(seed), tokenizer)
            assert length - 1 <= prompt_length(tokenizer, example.prompt) <= length
            assert make_examples(task, length, 1, int(seed), tokenizer) == [example]
            assert example.prompt.endswith("\nAnswer:") and "\n" not in example.answer
            joined = (" " if task == "ruler_variable_tracking" else ", ").join(example.targets)
            assert example.answer == joined
            assert _solve_ruler(example.prompt) == example.answer
            _check_ruler_example(example)


def test_ruler_tasks_reach_rulers_sizes_in_longer_prompts(rng):
    tokenizer, seed = ByteTokenizer(), int(rng.integers(1 << 20))
    (niah,) = make_examples("niah_multikey", 1024, 1, seed, tokenizer)
    assert niah.prompt.count("special magic numbers for") == 4
    (words,) = make_examples("common_words", 12_000, 1, seed, tokenizer)
    _check_ruler_example(words)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", words.prompt))
    assert len(words.targets) == 10 and {counts[w] for w in words.targets} == {30}
    assert {c for w, c in counts.items() if w not in words.targets} == {3}


class CannedLM:
    """Writes the given text after each prompt; every answer token scores 0."""

    context = 1 << 16

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs = tokenizer, outputs

    def generate(self, prompts, max_new_tokens):
        texts = [self.outputs[self.tokenizer.decode(p).decode("utf-8")] for p in prompts]
        return [text_ids(self.tokenizer, text) for text in texts]

    def score_tokens(self, sequences):
        return [(np.zeros(len(s) - 1), np.ones(len(s) - 1, bool)) for s in sequences]


def test_string_match_all_is_the_fraction_of_expected_strings_found(rng):
    assert string_match_all("4096512 and ZOBID", ("4096512", "zobid")) == 1.0
    assert string_match_all("only 4096512", ("4096512", "zobid")) == 0.5
    assert string_match_all("neither", ("4096512", "zobid")) == 0.0
    tokenizer, seed = ByteTokenizer(), int(rng.integers(1 << 20))
    first, second = make_examples("ruler_variable_tracking", 320, 2, seed, tokenizer)
    assert first.targets == tuple(first.answer.split()) and len(first.targets) == 5

    def scores(one, two):
        lm = CannedLM(tokenizer, {first.prompt: one, second.prompt: two})
        return score_examples(lm, tokenizer, [first, second])

    shuffled = " " + ", ".join(reversed(first.targets)).lower() + "\n"
    assert scores(continuation(first.answer), continuation(second.answer)) == pytest.approx(
        dict(
            examples=2,
            exact_match=1.0,
            string_match_all=1.0,
            answer_logprob=0.0,
            answer_token_accuracy=1.0,
        )  # fmt: skip
    )
    all_of_them = scores(shuffled, continuation(second.answer))
    assert all_of_them["string_match_all"] == 1.0 and all_of_them["exact_match"] == 0.5
    half = scores(continuation(first.answer), " none of them\n")
    assert half["string_match_all"] == 0.5 and half["exact_match"] == 0.5
    names = " ".join(first.targets[:2])  # 2 of 5 names, then all of them on a second line
    partly = scores(f" {names}\n{first.answer}\n", " \n" + second.answer)
    assert partly["string_match_all"] == pytest.approx(0.2) and partly["exact_match"] == 0.0
    assert scores(" no\n", "")["string_match_all"] == 0.0
    kv = make_examples("kv_retrieval", 256, 1, seed, tokenizer)[0]
    assert kv.targets == (kv.answer,)


def _random_lm(context=2048):
    cfg = TransformerConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=16, mlp_dim=64)  # fmt: skip
    return TransformerLM(Transformer(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), context)


def test_a_random_model_scores_about_chance(rng):
    lm, tokenizer = _random_lm(), ByteTokenizer()
    seed = int(rng.integers(1 << 20))
    examples = make_examples("icl_classification", 200, 48, seed, tokenizer)
    scores = score_examples(lm, tokenizer, examples, generate=False)
    # 4 classes: chance 0.25, 48 examples: standard deviation 0.0625.
    assert 0.25 - 0.2 <= scores["choice_accuracy"] <= 0.25 + 0.2, scores
    kv = score_examples(lm, tokenizer, make_examples("kv_retrieval", 200, 2, seed, tokenizer))
    assert kv["exact_match"] == 0.0 and kv["answer_logprob"] < -3.0


def test_over_long_prompts_raise_and_are_never_truncated(rng):
    lm, tokenizer = _random_lm(context=512), ByteTokenizer()
    examples = make_examples("kv_retrieval", 600, 1, 0, tokenizer)
    with pytest.raises(
        ValueError, match=r"exceeds the model's context of 512 tokens .*never truncated"
    ):
        score_examples(lm, tokenizer, examples)
    with pytest.raises(ValueError, match=r"exceeds the model's context"):
        lm.score_tokens([[1] * 513])
    settings = type("E", (), dict(tasks="kv_retrieval", lengths="1024,9000", context=8192))
    with pytest.raises(ValueError, match=r"9000 tokens exceed evals.context=8192"):
        parse_settings(settings)
    settings.tasks = "kv_retrieval,haystack"
    with pytest.raises(ValueError, match=r"evals.tasks=.*valid names are"):
        parse_settings(settings)


class KnownLM:
    """Every token's log-probability is minus its position (so bucket means are known)."""

    context = 4096

    def score_tokens(self, sequences):
        return [
            (-np.arange(1, len(s), dtype=np.float64), np.ones(len(s) - 1, bool)) for s in sequences
        ]


def test_loss_by_position_buckets_and_plot(tmp_path):
    documents = [np.zeros(3000, np.int32), np.zeros(600, np.int32), np.zeros(1, np.int32)]
    buckets = loss_by_position(KnownLM(), documents, max_length=2500, buckets=(0, 512, 2048))
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 512), (512, 2048), (2048, 2500)]
    assert [b["documents"] for b in buckets] == [2, 2, 1]
    assert buckets[0]["tokens"] == 511 * 2 and buckets[0]["loss"] == pytest.approx(256.0)
    positions = list(range(512, 2048)) + list(range(512, 600))
    assert buckets[1]["loss"] == pytest.approx(np.mean(positions))
    assert buckets[2]["tokens"] == 2500 - 2048
    path = plot_loss_by_position({"known": buckets}, str(tmp_path / "curve.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_mode_appends_results_and_prints_a_table(smoke_config, tmp_path, capsys):
    from lcx.modes import run

    c = smoke_config
    run(c, str(tmp_path))
    c.mode = "evaluate"
    c.evals.update(lengths="256,512", examples=2, context=640, position_length=640, documents=4)
    c.evals.tasks = ",".join(TASKS)
    result = run(c, str(tmp_path))
    assert result["records"] == len(TASKS) * 2 + 1
    lines = [json.loads(x) for x in open(tmp_path / "evals.jsonl")]
    assert {(r["task"], r.get("length")) for r in lines} >= {
        ("kv_retrieval", 256),
        ("copy_span", 512),
    }
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in lines if "exact_match" in r)
    assert all(0.0 <= r["string_match_all"] <= 1.0 for r in lines if "exact_match" in r)
    assert {r["task"] for r in lines if "string_match_all" in r} == set(TASKS)
    assert lines[-1]["task"] == "loss_by_position" and lines[-1]["buckets"][0]["tokens"] > 0
    assert os.path.isfile(tmp_path / "loss_by_position.png")
    out = capsys.readouterr().out
    assert "icl_classification" in out and "loss by position: 0-512: " in out


def test_finetune_recipe_trains_on_short_task_examples(tmp_path):
    from lcx.checkpoints import save_hf
    from lcx.config_loading import load_config
    from lcx.evals.finetune import write_task_corpus
    from lcx.evals.scoring import first_line
    from lcx.modes import run

    paths = write_task_corpus(str(tmp_path / "data"), 12, lengths=(256, 320))
    for path, task in zip(paths, list(TAUGHT_TASKS) * 3, strict=False):
        text = open(path).read()
        prompt, answer = text.rsplit(":", 1)
        assert task in path and answer.endswith("\n") and first_line(answer)
        assert (
            abs(
                prompt_length(ByteTokenizer(), prompt + ":")
                - (256, 320)[paths.index(path) // len(TAUGHT_TASKS) % 2]
            )
            <= 2
        )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, "configs", "evals_finetune.py"), "smoke")
    save_hf(Transformer(TransformerConfig(**c.model), rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
    c.init.hf_checkpoint, c.data.paths = str(tmp_path / "hf"), str(tmp_path / "data")
    record = run(c, str(tmp_path / "run"))
    assert record["step"] == 3 and np.isfinite(record["loss"])
