"""`--config.mode=evaluate`: the long-context tasks, loss by position and length
following (`evals.length.enabled`) on a workdir's latest checkpoint; results appended to
WORKDIR/evals.jsonl and printed as a table."""

from __future__ import annotations

import json
import os
import sys

import jax

from lcx.errors import UserError
from lcx.evals import length_following
from lcx.evals.positions import loss_by_position, plot_loss_by_position
from lcx.evals.scoring import TransformerLM, score_examples
from lcx.evals.tasks import TASKS, make_examples
from lcx.settings import resolve

RESULTS = "evals.jsonl"


def _names(value) -> list[str]:
    """A comma-separated string (or a sequence) as a list of names."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip() for x in items if str(x).strip()]


def parse_settings(ec) -> tuple[list[str], list[int]]:
    """(tasks, lengths) of `config.evals`, checked in one line each."""
    tasks = _names(ec.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"evals.tasks={ec.tasks!r}: valid names are {sorted(TASKS)}")
    if not tasks:  # the lengths are the tasks' prompt lengths
        if not (ec.loss_by_position or ec.length.enabled):
            raise UserError(
                f"evals.tasks={ec.tasks!r}: nothing to evaluate; name tasks (valid names are "
                f"{sorted(TASKS)}) or set evals.loss_by_position or evals.length.enabled"
            )
        return tasks, []
    try:
        lengths = [int(x) for x in _names(ec.lengths)]
    except ValueError:
        raise UserError(f"evals.lengths={ec.lengths!r}: comma-separated token counts") from None
    if not lengths or min(lengths) <= 0:
        raise UserError(f"evals.lengths={ec.lengths!r}: positive token counts")
    if max(lengths) > ec.context:
        raise UserError(
            f"evals.lengths={ec.lengths!r}: {max(lengths)} tokens exceed evals.context="
            f"{ec.context} (prompts are never truncated)"
        )
    return tasks, lengths


def evaluate_workdir(config, workdir: str, out=None) -> dict:
    """Score the latest checkpoint of `workdir`; a summary record."""
    from lcx.train.input import load_split
    from lcx.train.restore import restore_model

    config = resolve(config)
    ec, out = config.evals, out or sys.stdout
    tasks, lengths = parse_settings(ec)
    chat = config.data.format == "chat"
    instructions = (
        length_following.load_instructions(ec.length, ec.seed) if ec.length.enabled else None
    )
    model, step, tokenizer = restore_model(config, workdir, with_tokenizer=True)
    lm = TransformerLM(model, tokenizer, ec.context)
    records = []
    for task in tasks:
        for length in lengths:
            examples = make_examples(task, length, ec.examples, ec.seed, tokenizer)
            scores = score_examples(lm, tokenizer, examples, generate=ec.generate, chat=chat)
            records.append({"step": step, "task": task, "length": length, **scores})
    if ec.loss_by_position:
        corpus, _ = load_split(config.data, "eval", None, tokenizer)
        count = min(corpus.num_documents, ec.documents)
        documents = [corpus.document(i) for i in range(count)]
        buckets = loss_by_position(lm, documents, min(ec.position_length, ec.context))
        records.append({"step": step, "task": "loss_by_position", "buckets": buckets})
    if instructions is not None:
        report = length_following.length_following(model, tokenizer, ec, instructions, chat=chat)
        records.append({"step": step, **report})
    path = os.path.join(workdir, RESULTS)
    if jax.process_index() == 0:
        with open(path, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        if ec.loss_by_position:
            plot_loss_by_position(
                {f"step {step}": buckets}, os.path.join(workdir, "loss_by_position.png")
            )
        out.write(table(records) + "\n")
    return {"step": step, "records": len(records), "results": path}


def table(records) -> str:
    """Task x length: exact match / teacher-forced answer token accuracy (and choices)."""
    tasks = [r for r in records if r["task"] in TASKS]
    lengths = sorted({r["length"] for r in tasks})
    lines = ["task".ljust(20) + "".join(f"{n:>18}" for n in lengths)] if tasks else []
    for task in dict.fromkeys(r["task"] for r in tasks):
        cells = []
        for n in lengths:
            r = next((r for r in tasks if r["task"] == task and r["length"] == n), None)
            cell = (
                ""
                if r is None
                else f"{r.get('exact_match', float('nan')):.2f}/{r['answer_token_accuracy']:.2f}"
            )
            if r is not None and "choice_accuracy" in r:
                cell += f"/{r['choice_accuracy']:.2f}"
            cells.append(f"{cell:>18}")
        lines.append(task.ljust(20) + "".join(cells))
    if tasks:
        lines.append(
            "cells: exact match / answer token accuracy (teacher-forced) [/ choice accuracy]"
        )
    for r in records:
        if r["task"] == "loss_by_position":
            kept = [b for b in r["buckets"] if b["loss"] is not None]
            parts = [f"{b['start']}-{b['end']}: {b['loss']:.3f}" for b in kept]
            lines.append("loss by position: " + ", ".join(parts))
        elif r["task"] == length_following.TASK:
            lines.extend(length_following.summary_lines(r))
    return "\n".join(lines)
