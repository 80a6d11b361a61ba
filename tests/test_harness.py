"""lm-evaluation-harness on lcx (lcx.evals.harness): each request type against a plain
reference, and the task YAMLs of tests/data/harness run offline through lm-eval."""

from __future__ import annotations

import numpy as np
import pytest

from lcx.data import ByteTokenizer
from lcx.data.tokenizer import text_ids
from lcx.evals.harness import HarnessLM
from lcx.generate import generate
from tests.conftest import ROOT, tiny_byte_model

TASKS = f"{ROOT}/tests/data/harness"
CONTEXT = 96


@pytest.fixture(scope="module")
def lm():
    return HarnessLM(
        tiny_byte_model(),
        ByteTokenizer(),
        max_length=CONTEXT,
        slots=4,
        token_budget=40,
    )


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _logprobs_alone(lm, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from one unpacked forward, float64 softmax."""
    logits = lm.model(
        np.asarray([ids]), np.ones((1, len(ids)), np.int32), np.arange(len(ids))[None]
    )[0]
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))])


def test_loglikelihood_packs_requests_and_equals_each_scored_alone(lm):
    pairs = [("def parse(", "text):"), ("x =", " 1"), ("", "import os"), ("class A", ":")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        ctx = text_ids(lm.tokenizer, context) if context else [lm.prefix_token_id]
        cont = text_ids(lm.tokenizer, continuation)
        want = _logprobs_alone(lm, ctx + cont)[-len(cont) :]
        np.testing.assert_allclose(logprob, want.sum(), rtol=1e-4)
        assert isinstance(greedy, bool)
    with pytest.raises(ValueError, match="max_length=96"):
        lm.loglikelihood(_instances("loglikelihood", [("x" * 90, "y" * 10)]))


def test_rolling_loglikelihood_covers_a_long_document_in_windows(lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    document = "def f(x):\n    return x * 2\n" * 12  # 336 bytes: four windows
    (total,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(document,)]))
    ids = text_ids(lm.tokenizer, document)
    windows = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(
            token_list=ids, prefix_token=lm.prefix_token_id, max_seq_len=CONTEXT - 1, context_len=1
        )
    ]
    assert len(windows) == 4 and [t for _, tgt in windows for t in tgt] == ids  # each token once
    assert all(len(c) + len(t) <= CONTEXT for c, t in windows)  # no window truncated
    want = sum(_logprobs_alone(lm, c + t)[-len(t) :].sum() for c, t in windows)
    np.testing.assert_allclose(total, want, rtol=1e-5)


def test_generate_until_equals_greedy_generate_cut_at_the_stop_string(lm):
    contexts = ["def main(", "import o", "for i in ran"]
    full = [
        ByteTokenizer().decode(t).decode("utf-8", "replace")
        for t in generate(
            lm.model,
            [text_ids(lm.tokenizer, c) for c in contexts],
            max_new_tokens=12,
            stop_ids=(ByteTokenizer.eos_id,),
        )
    ]
    stops = [full[0][3:5], "\n", full[2][:1]]
    got = lm.generate_until(
        _instances(
            "generate_until",
            [(c, {"until": [s], "max_gen_toks": 12}) for c, s in zip(contexts, stops, strict=True)],
        )
    )
    assert got == [f[: f.index(s)] if s in f else f for f, s in zip(full, stops, strict=True)]
    assert got[2] == ""


@pytest.mark.integration
def test_the_task_yamls_run_offline_through_lm_eval(lm, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the YAMLs name their data files from the repository root
    manager = TaskManager(include_path=TASKS, include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["lcx_pick", "lcx_complete", "lcx_documents"], task_manager=manager
    )["results"]
    assert 0 <= results["lcx_pick"]["acc,none"] <= 1
    assert 0 <= results["lcx_complete"]["exact_match,none"] <= 1
    assert results["lcx_documents"]["word_perplexity,none"] > 1


def test_a_folder_of_plain_tasks_skips_indexing_lm_evals_own(monkeypatch):
    import lm_eval.tasks

    from lcx.evals import harness

    made = []

    class Recorded(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, include_defaults=True):
            made.append(include_defaults)
            if include_defaults:
                return  # lm-eval's own index: seconds, and not what is tested
            super().__init__(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recorded)
    assert sorted(harness.task_manager(["lcx_pick", "lcx_complete"], TASKS).all_subtasks) == [
        "lcx_complete", "lcx_documents", "lcx_pick"
    ]  # fmt: skip
    assert made == [False]
    harness.task_manager(["lcx_pick", "hellaswag"], TASKS)  # a built-in task: both indexes
    assert made == [False, False, True]
    harness.task_manager(["hellaswag"], None)
    assert made == [False, False, True, True]
