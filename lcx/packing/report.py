"""Packing report: every strategy at several row lengths on a corpus, and a PNG.

    python -m lcx.packing.report                                  # the embedded corpus
    python -m lcx.packing.report --config configs/lm_tiny.py      # that config's data
    python -m lcx.packing.report --row_lens 2048,8192 --max_tokens 2000000 --png fill.png

Prints, per strategy and row length: padding fraction, tokens dropped, documents split,
attention work per token relative to dense rows (sum_i L_i^2 / T^2), and packing
throughput (real tokens per second of the host pipeline on this machine). Saves a PNG
with the histogram of document lengths and, per strategy, of row fill.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lcx.data.tokenizer import ByteTokenizer
from lcx.errors import UserError
from lcx.packing.stats import markdown_table, measure
from lcx.packing.strategies import REGISTRY, PipelineOptions

BYTES = ByteTokenizer()  # the report tokenizes bytes
# Without --config: the embedded corpus, and these settings for the strategies that take
# them (the dd buckets are fit to each row length: up to the row, from 2^min_log2).
REPORT_DATA = {
    "paths": (),
    "eval_fraction": 0.02,
    "max_documents": 0,
    "first_fit": {"num_bins": 128},
    "best_fit": {"num_bins": 128},
    "dd": {"min_log2": 6, "max_log2": 13, "curriculum": "grow_p2", "cycles": 1},
}


def _data_config(path: str | None) -> dict:
    """config.data of a config file (ml-collections), or REPORT_DATA."""
    if path is None:
        return REPORT_DATA
    from lcx.config_loading import load_config

    return load_config(*path.split(":", 1)).data.to_dict()


def load_corpus(data) -> object:
    """The train split of config.data, tokenized (not cached)."""
    from lcx.data import load_or_tokenize, select_documents
    from lcx.data.corpus import corpus_paths

    docs = select_documents(
        corpus_paths(data["paths"]),
        "train",
        eval_fraction=data["eval_fraction"],
        max_documents=data["max_documents"],
    )
    if not docs:
        raise UserError("data.paths: no documents in the train split")
    return load_or_tokenize(docs, BYTES, None)


def settings_at(packing: str, row_len: int, data) -> dict | None:
    """config.data.<packing> at one row length: dd's buckets reach up to the row."""
    settings = data[packing] if REGISTRY[packing].settings else None
    if packing != "dd" or settings is None:
        return settings
    max_log2 = row_len.bit_length() - 1
    return dict(settings, max_log2=max_log2, min_log2=min(settings["min_log2"], max_log2))


def run(corpus, *, row_lens, strategies, data=REPORT_DATA, batch_size=8, max_tokens=0):
    """PackingStats for every (strategy, row length), settings from `data`."""
    results = []
    for row_len in row_lens:
        for packing in strategies:
            opts = PipelineOptions(
                seq_len=row_len,
                batch_size=batch_size,
                packing=packing,
                pad_id=BYTES.pad_id,
                settings=settings_at(packing, row_len, data),
            )
            results.append(measure(corpus, opts, max_tokens=max_tokens))
    return results


def save_png(corpus, results, path: str) -> None:
    """Document length histogram and per-strategy row fill histograms."""
    from matplotlib.figure import Figure  # no pyplot: headless, and no backend switched

    fig = Figure(figsize=(10, 3.5))
    ax_len, ax_fill = fig.subplots(1, 2)
    lengths = corpus.lengths[corpus.lengths > 0]
    ax_len.hist(lengths, bins=np.logspace(0, np.log10(lengths.max() + 1), 40))
    ax_len.set_xscale("log")
    ax_len.set(title="document lengths", xlabel="tokens", ylabel="documents")
    for s in results:
        if s.row_len == results[0].row_len:
            ax_fill.hist(s.row_fill, bins=20, range=(0, 1), histtype="step", label=s.packing)
    ax_fill.set(title=f"row fill at {results[0].row_len} tokens", xlabel="fill", ylabel="rows")
    ax_fill.set_yscale("log")
    ax_fill.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a config file[:arg]; default embedded")
    parser.add_argument("--row_lens", default="2048,8192,32768")
    parser.add_argument("--strategies", default=",".join(REGISTRY))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=4_000_000, help="0: whole epoch")
    parser.add_argument("--png", default="packing_report.png")
    args = parser.parse_args(argv)
    try:
        data = _data_config(args.config)
        corpus = load_corpus(data)
        row_lens = [int(x) for x in args.row_lens.split(",")]
        strategies = [s for s in args.strategies.split(",") if s]
        unknown = set(strategies) - set(REGISTRY)
        if unknown:
            raise UserError(f"--strategies: unknown {sorted(unknown)}; valid: {tuple(REGISTRY)}")
        results = run(
            corpus,
            row_lens=row_lens,
            strategies=strategies,
            data=data,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
        )
    except ValueError as e:
        print(f"lcx.packing.report: {e}", file=sys.stderr)
        return 2
    budget = args.max_tokens or corpus.num_tokens
    print(f"{corpus.num_documents} documents, {corpus.num_tokens:,} tokens; up to {budget:,}")
    print("tokens per strategy and row length\n")
    print(markdown_table(results))
    save_png(corpus, results, args.png)
    print(f"\nsaved {args.png}")
    return results


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
