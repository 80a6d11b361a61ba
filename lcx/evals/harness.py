"""lm-evaluation-harness on lcx models: an lm-eval `LM` named "lcx", and its command line.

    python -m lcx.evals.harness --workdir W --tasks T [--include_path D] [--limit N]

runs lm-eval's tasks (its own, or YAML files in D) on the workdir's latest checkpoint
(the config its run recorded) and prints lm-eval's table; `--output F` writes the
results as JSON. Inside Python, `HarnessLM(model, tokenizer, max_length=...)` is an
`lm_eval.api.model.LM` for `lm_eval.simple_evaluate(model=...)`, and `--model lcx
--model_args workdir=W` reaches it from lm-eval's own command line once this module is
imported (the registry line below).

How each request type runs (Gao et al., "The Language Model Evaluation Harness",
arXiv 2405.14782):
- `loglikelihood`: every (context, continuation) of the call is scored by
  `lcx.generate.scoring.PackedScorer`, many requests to a packed row (attention kept
  within each); a request longer than `max_length` is an error, never truncated.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens
  over the whole document, each window scored as above, summed.
- `generate_until`: the serving engine (continuous batching, `lcx.generate.Engine`),
  stopped on EOS or the template's end of turn, and on the `until` strings as the text
  streams (`lcx.generate.text.TextStream`).

Tokens follow lm-eval's API models (`local-completions`): text without BOS unless
`add_bos_token` (the prefix token, BOS, begins an empty context and every rolling
window), so the same task scored here and through `mode=serve` with local-completions
sees the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lm_eval.models  # noqa: F401 (lm-eval's own models first: see the registry line)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lcx.data.sft import turn_stop_ids
from lcx.data.tokenizer import text_ids
from lcx.generate.engine import Engine, Request
from lcx.generate.sampling import SamplingParams
from lcx.generate.scoring import PackedScorer
from lcx.generate.text import TextStream


# lm-eval registers its own models on the first lookup only when its registry is empty,
# so they are imported above, before this line adds "lcx".
@register_model("lcx")
class HarnessLM(TemplateLM):
    """An lcx Transformer as an lm-eval LM.

    Args:
      model, tokenizer: the Transformer and its tokenizer; or `workdir` (and optionally
        `config`, a config file) to restore a run's latest checkpoint.
      max_length: tokens a request may span (default: the run's train.seq_len).
      max_gen_toks: new tokens of a generate_until request unless it says otherwise.
      slots, token_budget: the engine's sizes.
      add_bos_token: begin every context with BOS.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        workdir=None,
        config=None,
        max_length=None,
        max_gen_toks=256,
        slots=8,
        token_budget=256,
        add_bos_token=False,
    ):
        super().__init__()
        if model is None:
            model, tokenizer, seq_len = _restore(workdir, config)
            max_length = max_length or seq_len
        if tokenizer is None or not max_length:
            raise ValueError("HarnessLM needs a tokenizer and max_length with a model")
        self.model, self.tokenizer = model, tokenizer
        self._max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self.slots, self.token_budget = int(slots), max(int(token_budget), int(slots) + 1)
        self.add_bos_token = add_bos_token in (True, "True", "true", "1")
        self._scorer = PackedScorer(model, self._max_length, tokenizer.pad_id, top=1)
        self._engine = None

    # ---- what TemplateLM needs --------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self):
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return ([self.tokenizer.bos_id] if bos else []) + text_ids(self.tokenizer, string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens).decode("utf-8", errors="replace")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of the continuation's log-probabilities, whether each of its tokens is
        the most likely one) per (cache key, context ids, continuation ids)."""
        sequences = []
        for i, (_, context, continuation) in enumerate(requests):
            sequence = list(context) + list(continuation)
            if len(sequence) > self.max_length:
                raise ValueError(
                    f"loglikelihood request {i} has {len(sequence)} tokens; max_length="
                    f"{self.max_length} (lcx never truncates: raise max_length)"
                )
            sequences.append(sequence)
        out = []
        for (key, _, continuation), scores in zip(
            requests, self._scorer.score(sequences), strict=True
        ):
            n = len(continuation)
            answer = (float(scores.logprob[-n:].sum()), bool(scores.is_greedy[-n:].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over disjoint windows of `max_length` tokens."""
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            for context, target in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,  # a window and its one token of context
                    context_len=1,
                ),
            ):
                windows.append((None, context, target))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued by the engine until EOS, a stop string or max_gen_toks."""
        engine = self._engine_for_requests()
        streams, ids = {}, []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            prompt = self.tok_encode(context)
            if len(prompt) + n > self.max_length:
                raise ValueError(
                    f"generate_until request {i}: a context of {len(prompt)} tokens and "
                    f"max_gen_toks={n} exceed max_length={self.max_length} (never truncated)"
                )
            sampling = SamplingParams(temperature, seed=i)
            request_id = engine.submit(Request(prompt, n, sampling, turn_stop_ids(self.tokenizer)))
            streams[request_id] = TextStream(self.tokenizer, tuple(until))
            ids.append(request_id)
        texts = {}

        def on_event(event):
            stream = streams[event.request_id]
            _, stopped = stream.add(event.token)
            if stopped and not event.done:
                engine.cancel(event.request_id)
            if stopped:
                texts[event.request_id] = stream.text  # cut before the stop string
            elif event.done:
                stream.flush()
                texts[event.request_id] = stream.text

        engine.run(on_event)
        out = []
        for request, request_id in zip(requests, ids, strict=True):
            text = texts[request_id]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    def _engine_for_requests(self) -> Engine:
        """One engine for every call (one compilation)."""
        if self._engine is None:
            self._engine = Engine(
                self.model,
                slots=self.slots,
                max_length=self.max_length,
                token_budget=self.token_budget,
            )
        return self._engine


def _restore(workdir, config):
    """(model, tokenizer, train.seq_len) of a workdir's latest checkpoint."""
    from lcx.config_loading import load_config
    from lcx.settings import resolve
    from lcx.train.restore import restore_model
    from lcx.train.run_record import recorded_config

    if not workdir:
        raise ValueError("HarnessLM needs model and tokenizer, or workdir")
    settings = resolve(load_config(config) if config else recorded_config(workdir))
    model, _, tokenizer = restore_model(settings, workdir, with_tokenizer=True)
    return model, tokenizer, settings.train.seq_len


def main(argv=None) -> dict:
    """The command line (module docstring); lm-eval's results dict."""
    import lm_eval

    parser = argparse.ArgumentParser(
        prog="python -m lcx.evals.harness", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir", required=True, help="a run's directory (its latest checkpoint)"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", default=None, help="a folder of task YAML files")
    parser.add_argument("--config", default=None, help="config file (default: the run's record)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task at most")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=None, help="default: train.seq_len")
    parser.add_argument("--output", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    lm = HarnessLM(workdir=args.workdir, config=args.config, max_length=args.max_length)
    tasks = args.tasks.split(",")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(tasks, args.include_path),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
    )
    print(results_table(results["results"]))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results["results"], f, indent=1, default=str)
    return results


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index: the folder's own tasks alone when every name asked for is a
    plain task there (a group or tag may name built-in tasks), else the folder's and
    lm-eval's own. Indexing lm-eval's thousands of built-in YAML files takes seconds."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    include = os.path.abspath(include_path)
    own = TaskManager(include_path=include, include_defaults=False)
    if all(name in own.all_subtasks for name in tasks):
        return own
    return TaskManager(include_path=include)


def results_table(results: dict) -> str:
    """lm-eval's results as a markdown table of task, metric, value and its standard
    error. (lm-eval's own `make_table` formats through pytablewriter, which forks a
    process pool: unsafe once JAX has started its threads.)"""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metrics in sorted(results.items()):
        for key, value in sorted(metrics.items()):
            skip = key in ("alias", "sample_len") or "_stderr," in key
            if skip or not isinstance(value, (int, float)):
                continue
            name, _, fltr = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{fltr}")
            shown = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
            lines.append(f"| {task} | {name} | {value:.4f} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
