"""Training throughput: packed rows vs. the same documents padded one per row.

    python benchmarks/train_throughput.py                     # BENCHMARKS.md, ~3 min on 2 cores
    python benchmarks/train_throughput.py --smoke             # seconds, smoke-sized model
    python benchmarks/train_throughput.py --seq_len=4096 --batch_size=2
    python benchmarks/train_throughput.py --short_documents=256   # short-document corpus

Every variant trains the tiny model of configs/lm_tiny.py on the same corpus with the
same config except `config.data` packing fields: "padded" (one document piece per row,
the baseline) and "first_fit" with each `--num_packing_bins` (0: the config default,
one bin per batch row). Documents longer than a row are split into row-sized pieces in
every variant, so packing only gains on the pieces shorter than a row. Each step runs
through the library's own `StepRunner` (host batch, `put_batch`, the jitted step), as
`lcx.main` trains. After warm-up, repeats of `--steps` steps alternate between the
variants, so drifting background load hits them alike.

Throughput counts real target tokens (non-padding tokens whose next token is in the
same document, from `lcx.packing.batch_stats`) per second of wall time, input pipeline
included; the pipeline's own time is reported beside it. A timed repeat sees only
`steps * batch_size` rows, so its padding is a small sample: the padding and the
target tokens per step of `--stat_batches` batches drawn on the host alone are
reported too, and are the steadier estimate of what packing saves.

`--short_documents=MEAN` trains on a corpus of short documents instead: the embedded
corpus's files cut into pieces of exponentially distributed length (that mean, at least
2 bytes), written to a temporary directory (the first `--short_corpus_bytes` bytes).
Padding one such piece per row wastes most of the row; packing fills it, and attention
that skips other documents (the CPU default `xla_chunked`) keeps the packed row's
attention cost near that of its documents.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `configs` imports from the repository root, as for lcx.main

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import lm_tiny  # noqa: E402
from lcx.data import select_documents  # noqa: E402
from lcx.packing import batch_stats  # noqa: E402
from lcx.train.loop import Experiment  # noqa: E402
from lcx.train.runner import StepRunner  # noqa: E402

BASELINE = "padded"
TIMED = ("tokens_per_sec", "padding_fraction", "step_ms", "pipeline_ms")


def benchmark_config(*, seq_len: int, batch_size: int, smoke: bool = False, paths=(),
                     attention_implementation=None):  # fmt: skip
    """configs/lm_tiny.py (or its smoke variant) with the benchmark's row shape."""
    config = lm_tiny.get_config("smoke" if smoke else None)
    config.model.attention_implementation = attention_implementation
    config.train.update(seq_len=seq_len, batch_size=batch_size, micro_batch_size=0)
    config.train.update(progress=False, async_checkpoints=False)
    config.data.cache = False  # tokenizing is faster than writing a zarr cache per run
    if paths:
        config.data.paths = ",".join(paths)
    return config


def variants(packing: str = "first_fit", num_packing_bins=(0,)) -> dict[str, dict]:
    """Label -> `config.data` overrides: the padded baseline, then each packed variant."""
    out = {BASELINE: {"packing": BASELINE}}
    for bins in num_packing_bins:
        label = f"{packing}, {bins or 'batch_size'} bins"
        out[label] = {"packing": packing, packing: {"num_bins": bins}}
    return out


def write_short_documents(directory: str, mean: int, total_bytes: int, seed: int = 0) -> int:
    """The embedded corpus cut into exponential-length pieces, one file each; returns count."""
    rng = np.random.default_rng(seed)
    written = count = 0
    for doc in select_documents([], "train", eval_fraction=0.02):
        with open(doc.path, "rb") as f:
            data = f.read()
        start = 0
        while start < len(data) and written < total_bytes:
            n = max(2, int(rng.exponential(mean)))
            piece = data[start : start + n]
            with open(os.path.join(directory, f"piece{count:07d}.txt"), "wb") as f:
                f.write(piece)
            start, written, count = start + n, written + len(piece), count + 1
        if written >= total_bytes:
            break
    return count


class _TimedIterator:
    """A data iterator that adds the seconds spent in `next` to `seconds`."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - t0


class _Trainer:
    """One variant's experiment, state, step runner and data iterator."""

    def __init__(self, config, data_overrides: dict, workdir: str):
        config = config.copy_and_resolve_references()
        config.data.update(data_overrides)
        self.exp = Experiment(config, workdir)
        self.data = _TimedIterator(iter(self.exp.dataset("train")))
        self.state = self.exp.restore_or_init()
        self.runner = StepRunner(self.exp, config.train.batch_size)
        self.step = 0

    def run(self, steps: int) -> dict:
        """Train `steps` steps; wall time, pipeline time and the batches' statistics."""
        self.data.seconds = 0.0
        target_tokens, padding = 0, []
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            self.state, metrics, stats = self.runner(self.state, self.data, self.step)
            target_tokens += stats["target_tokens"]
            padding.append(stats["padding_fraction"])
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - t0
        return {
            "tokens_per_sec": target_tokens / seconds,
            "padding_fraction": statistics.fmean(padding),
            "step_ms": 1e3 * seconds / steps,
            "pipeline_ms": 1e3 * self.data.seconds / steps,
        }

    def pipeline_stats(self, batches: int) -> dict:
        """Padding and target tokens per step over `batches` batches, host only."""
        stats = [batch_stats(b) for b in itertools.islice(iter(self.exp.dataset("train")), batches)]
        return {
            "padding_fraction": statistics.fmean(s["padding_fraction"] for s in stats),
            "target_tokens_per_step": statistics.fmean(s["target_tokens"] for s in stats),
        }

    def close(self):
        self.exp.checkpointer.close()


def spread(values) -> dict:
    """Median, min and max of a list of floats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_variants(config, labelled: dict, *, steps, repeats, warmup, stat_batches):
    """Per label: the timed samples of each repeat, and the host-only pipeline statistics."""
    samples = {label: [] for label in labelled}
    with tempfile.TemporaryDirectory(prefix="lcx-bench-") as tmp:
        trainers = {}
        try:
            for i, (label, overrides) in enumerate(labelled.items()):
                trainers[label] = _Trainer(config, overrides, os.path.join(tmp, str(i)))
            pipeline = {label: t.pipeline_stats(stat_batches) for label, t in trainers.items()}
            for trainer in trainers.values():
                trainer.run(warmup)
            for _ in range(repeats):
                for label, trainer in trainers.items():
                    samples[label].append(trainer.run(steps))
        finally:
            for trainer in trainers.values():
                trainer.close()
    return samples, pipeline


def run(
    config,
    labelled: dict | None = None,
    *,
    steps: int = 5,
    repeats: int = 3,
    warmup: int = 2,
    stat_batches: int = 200,
) -> dict:
    """Time packed and padded training side by side.

    Args:
      config: a configs/lm_tiny.py config (see `benchmark_config`).
      labelled: label -> `config.data` overrides, the padded baseline included
        (default: `variants()`, first_fit against padded); nothing else differs.
      steps: training steps per timed repeat.
      repeats: timed repeats per variant, interleaved between variants.
      warmup: untimed steps first (the first one compiles).
      stat_batches: batches drawn on the host alone for the padding statistics.

    Returns:
      {"settings": {...}, "results": {label: row}}, where a row holds the median, min
      and max over repeats of each of TIMED, "ratio" (tokens/s over the baseline's in
      the same repeat), and from `stat_batches` host batches "pipeline_padding" and
      "token_ratio" (target tokens per step over the baseline's).
    """
    labelled = variants() if labelled is None else labelled
    if BASELINE not in labelled:
        raise ValueError(f"labelled={sorted(labelled)} must include the {BASELINE!r} baseline")
    if min(steps, repeats, warmup, stat_batches) < 1:
        raise ValueError(f"{steps=}, {repeats=}, {warmup=} and {stat_batches=} must be >= 1")
    samples, pipeline = time_variants(
        config, labelled, steps=steps, repeats=repeats, warmup=warmup, stat_batches=stat_batches
    )
    base, base_tokens = samples[BASELINE], pipeline[BASELINE]["target_tokens_per_step"]
    results = {}
    for label, rows in samples.items():
        results[label] = {k: spread([r[k] for r in rows]) for k in TIMED}
        paired = zip(rows, base, strict=True)
        ratios = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in paired]
        results[label]["ratio"] = spread(ratios)
        results[label]["pipeline_padding"] = pipeline[label]["padding_fraction"]
        results[label]["token_ratio"] = pipeline[label]["target_tokens_per_step"] / base_tokens
    timing = dict(steps=steps, repeats=repeats, warmup=warmup, stat_batches=stat_batches)
    return {"settings": run_settings(config, **timing), "results": results}


def run_settings(config, **timing) -> dict:
    """What the numbers depend on, for the report."""
    m = config.model
    return {
        "seq_len": config.train.seq_len,
        "batch_size": config.train.batch_size,
        "model": f"d_model={m.d_model} layers={m.num_layers} heads={m.num_heads}",
        "attention": m.attention_implementation or f"default ({jax.default_backend()})",
        "corpus": config.data.paths or "embedded (Python stdlib)",
        "max_documents": config.data.max_documents,
        "backend": f"{jax.default_backend()} x{jax.device_count()}",
        "jax": jax.__version__,
        **timing,
    }


def cell(spread: dict, fmt: str) -> str:
    """'median (min–max)'."""
    return f"{spread['median']:{fmt}} ({spread['min']:{fmt}}–{spread['max']:{fmt}})"


def markdown_table(result: dict) -> str:
    """One row per variant: median (min–max) over repeats, then the host-only statistics."""
    batches = result["settings"]["stat_batches"]
    lines = [
        "| variant | target tokens/s | ÷ padded | padding | ms/step | input ms/step "
        f"| padding, {batches} batches | target tokens ÷ padded, {batches} batches |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in result["results"].items():
        cells = (
            label,
            cell(r["tokens_per_sec"], ",.0f"),
            cell(r["ratio"], ".3f"),
            cell(r["padding_fraction"], ".3f"),
            cell(r["step_ms"], ",.0f"),
            cell(r["pipeline_ms"], ".1f"),
            f"{r['pipeline_padding']:.3f}",
            f"{r['token_ratio']:.3f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq_len", type=int, default=2048, help="row length in tokens")
    p.add_argument("--batch_size", type=int, default=4, help="rows per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile)")
    p.add_argument("--stat_batches", type=int, default=500, help="host batches for padding")
    p.add_argument("--packing", default="first_fit", choices=("first_fit", "best_fit"))
    p.add_argument(
        "--num_packing_bins", default="0,256", help="comma-separated; 0: one per batch row"
    )
    p.add_argument("--smoke", action="store_true", help="the smoke-sized model and corpus")
    p.add_argument("--paths", default="", help="corpus files or directories, comma-separated")
    p.add_argument(
        "--short_documents", type=int, default=0, help="mean length of a short-document corpus"
    )
    p.add_argument("--short_corpus_bytes", type=int, default=4_000_000)
    p.add_argument(
        "--attention_implementation", default=None, help="a key of IMPLEMENTATIONS; default: best"
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse_args(argv)
    if args.short_documents:
        with tempfile.TemporaryDirectory(prefix="lcx-short-") as corpus:
            pieces = write_short_documents(corpus, args.short_documents, args.short_corpus_bytes)
            print(f"short-document corpus: {pieces:,} pieces, mean {args.short_documents} bytes")
            return _main(args, argv, [corpus])
    return _main(args, argv, [p for p in args.paths.split(",") if p])


def _main(args, argv, paths) -> dict:
    """The benchmark on `paths` (the embedded corpus when empty)."""
    config = benchmark_config(
        seq_len=args.seq_len, batch_size=args.batch_size, smoke=args.smoke, paths=paths,
        attention_implementation=args.attention_implementation,
    )  # fmt: skip
    bins = [int(b) for b in args.num_packing_bins.split(",")]
    result = run(
        config,
        variants(args.packing, bins),
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        stat_batches=args.stat_batches,
    )
    flags = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "benchmarks/train_throughput.py", *flags])
    print(f"`{command}`\n")
    print(", ".join(f"{k}={v}" for k, v in result["settings"].items()) + "\n")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
