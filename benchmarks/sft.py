"""Packed SFT: padding and throughput against pre-training at the same shapes.

    python benchmarks/sft.py                 # BENCHMARKS.md, "Packed SFT", ~4 min on 2 cores
    python benchmarks/sft.py --smoke         # seconds, smoke-sized model

A long-tailed set of conversations (lengths log-normal: median `--median` tokens,
sigma `--sigma`, cut at the row length; a system turn in a third, one to three user and
assistant turns, random words) is written as JSONL and trained with
`data.format = "chat"` (the loss on assistant turns only: `lcx.posttrain.sft`), packed
by `--packing` (best_fit) into rows of `--seq_len`. The baseline, "pre-training", trains
on the very same conversations rendered by the chat template as plain text files
(`data.format = "text"`: every token a target), packed the same way: same model, same
row shape, about the same tokens, so the ratio of target tokens per second is what
the loss weights cost. Steps run through the library's `StepRunner`, interleaved
between the two (benchmarks/train_throughput.py's timing loop). Reported: the
padding of the packed rows, tokens/s of each and their ratio (median, min–max over
repeats), and the share of tokens the SFT loss trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks.train_throughput import benchmark_config, cell, spread, time_variants  # noqa: E402
from lcx.data import ByteTokenizer  # noqa: E402

BASELINE = "pre-training"
WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "which one you were all we when there can more if out so what time up about into than "
    "them only other new some could these two may then do first any my now such like our"
).split()


def conversation_set(count: int, *, median: float, sigma: float, longest: int, seed: int = 0):
    """`count` conversations of log-normal total length (byte tokens, template included)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        total = int(np.clip(rng.lognormal(np.log(median), sigma), 24, longest - 16))
        turns = int(rng.integers(1, 4))
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": _words(rng, 8)})
        budget = max(4, total // (6 * turns))  # about 6 bytes a word
        for _ in range(turns):
            messages.append({"role": "user", "content": _words(rng, max(2, budget // 3))})
            messages.append({"role": "assistant", "content": _words(rng, budget)})
        out.append({"messages": messages})
    return out


def _words(rng, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=n)) + "."


def write_sets(directory: str, conversations) -> tuple[str, str]:
    """(the JSONL of the conversations, a directory of the same rendered as text files)."""
    tokenizer = ByteTokenizer()
    jsonl = os.path.join(directory, "conversations.jsonl")
    text = os.path.join(directory, "text")
    os.makedirs(text)
    with open(jsonl, "w") as f:
        for i, c in enumerate(conversations):
            f.write(json.dumps(c) + "\n")
            rendered = tokenizer.render_chat(c["messages"]).replace("<s>", "").replace("</s>", "\n")
            with open(os.path.join(text, f"{i:06d}.txt"), "w") as g:
                g.write(rendered)
    return jsonl, text


def run(args) -> dict:
    config = benchmark_config(seq_len=args.seq_len, batch_size=args.batch_size, smoke=args.smoke)
    conversations = conversation_set(
        args.conversations, median=args.median, sigma=args.sigma, longest=args.seq_len
    )
    with tempfile.TemporaryDirectory(prefix="lcx-sft-") as tmp:
        jsonl, text = write_sets(tmp, conversations)
        packing = {"packing": args.packing}
        labelled = {
            BASELINE: {"format": "text", "paths": text, **packing},
            "sft": {"format": "chat", "paths": jsonl, **packing},
        }
        samples, pipeline = time_variants(
            config,
            labelled,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            stat_batches=args.stat_batches,
        )
    base = samples[BASELINE]
    results = {}
    for label, rows in samples.items():
        results[label] = {k: spread([r[k] for r in rows]) for k in ("tokens_per_sec", "step_ms")}
        ratios = [
            a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(rows, base, strict=True)
        ]
        results[label]["ratio"] = spread(ratios)
        results[label]["pipeline_padding"] = pipeline[label]["padding_fraction"]
    trained = sum(
        len(m["content"]) + 1
        for c in conversations
        for m in c["messages"]
        if m["role"] == "assistant"
    )
    lengths = [len(ByteTokenizer().apply_chat_template(c["messages"])) for c in conversations]
    total = sum(lengths)
    settings = {
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "packing": args.packing,
        "conversations": args.conversations,
        "median_tokens": float(np.median(lengths)),
        "p99_tokens": float(np.percentile(lengths, 99)),
        "trained_share": trained / total,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    return {"settings": settings, "results": results}


def markdown_table(result: dict) -> str:
    lines = [
        "| variant | target tokens/s | ÷ pre-training | ms/step | padding (host batches) |",
        "|---|---|---|---|---|",
    ]
    for label, r in result["results"].items():
        cells = (
            label,
            cell(r["tokens_per_sec"], ",.0f"),
            cell(r["ratio"], ".3f"),
            cell(r["step_ms"], ",.0f"),
            f"{r['pipeline_padding']:.3f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--packing", default="best_fit", choices=("best_fit", "first_fit", "ffd"))
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--median", type=float, default=400.0, help="median tokens")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma: the tail")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stat_batches", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="the smoke-sized model")
    args = p.parse_args(argv)
    result = run(args)
    flags = sys.argv[1:] if argv is None else list(argv)
    print(f"`{' '.join(['python', 'benchmarks/sft.py', *flags])}`\n")
    print(", ".join(f"{k}={v}" for k, v in result["settings"].items()) + "\n")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
