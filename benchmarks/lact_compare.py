"""Full attention vs sliding-window attention vs LaCT hybrid, equal parameters and tokens.

    python benchmarks/lact_compare.py            # the BENCHMARKS.md run (CPU, ~15 minutes)
    python benchmarks/lact_compare.py --smoke    # seconds

Three tiny LMs train on the embedded corpus through `lcx.train.train_and_evaluate` on
the same packed rows for the same number of tokens:
- `full`: causal attention over the whole row in every layer;
- `swa`: causal attention within a sliding window in every layer;
- `lact`: every layer a LaCT layer (fast weights updated once per chunk, plus the same
  sliding window of attention), the paper's hybrid.
The attention models' MLP is widened so the parameter counts match LaCT's (reported).
Each model is then evaluated on the eval split's documents, one per row: documents
shorter than 2K tokens (whole), and documents longer than 8K (their first `long_len`
tokens), where positions past the training row length and past the window need memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lcx.config_loading import load_config  # noqa: E402
from lcx.model import Transformer, TransformerConfig  # noqa: E402
from lcx.settings import resolve  # noqa: E402
from lcx.train import train_and_evaluate  # noqa: E402
from lcx.train.input import load_split  # noqa: E402
from lcx.train.loop import Experiment  # noqa: E402
from lcx.train.step import lm_loss  # noqa: E402

VARIANTS = ("full", "swa", "lact")
SHORT, LONG = 2048, 8192


def param_count(model_cfg: TransformerConfig) -> int:
    """Number of parameters of the model, without allocating them."""
    shapes = jax.eval_shape(lambda: nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(0))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _with(cfg: TransformerConfig, **changes) -> TransformerConfig:
    """A copy of a model config with some fields changed."""
    return TransformerConfig(**{**cfg.__dict__, **changes})


def variant_configs(*, smoke: bool, steps: int, seq_len: int, batch_size: int, window: int):
    """The three configs, attention MLPs widened to LaCT's parameter count."""
    base = load_config(os.path.join(ROOT, "configs", "lm_lact_tiny.py"), "smoke" if smoke else None)
    base.train.update(steps=steps, seq_len=seq_len, batch_size=batch_size, progress=False)
    base.train.update(eval_every=0, checkpoint_every=steps, log_every=max(1, steps // 10))
    base.schedule.warmup_steps = max(1, steps // 10)
    if not smoke:
        base.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32)
        base.model.update(mlp_dim=384)
    base.model.lact.update(chunk_size=window, window=window)
    base.model.num_kv_heads = base.model.num_heads
    lact_model = TransformerConfig(**base.model)
    target = param_count(lact_model)
    configs = {}
    for name in VARIANTS:
        c = base.copy_and_resolve_references()
        if name != "lact":
            c.model.block_pattern = ("attention",)
            c.model.attention_window = window if name == "swa" else None
            attn = TransformerConfig(**c.model)
            per_unit = param_count(_with(attn, mlp_dim=attn.mlp_dim + 1)) - param_count(attn)
            extra = round((target - param_count(attn)) / per_unit)
            c.model.mlp_dim = attn.mlp_dim + max(0, extra)
        configs[name] = c
    return configs


def eval_rows(config, workdir: str, *, long_len: int, max_docs: int, short_len: int = SHORT):
    """(short rows, long rows): eval documents one per row, as token arrays (a short one's
    first `short_len` tokens: all of it unless smoke-sized)."""
    corpus, _ = load_split(resolve(config).data, "eval", workdir)
    docs = [corpus.document(i) for i in range(corpus.num_documents)]
    short = [d[:short_len] for d in docs if len(d) < SHORT][:max_docs]
    long = [d[:long_len] for d in docs if len(d) > LONG][:max_docs]
    return short, long


def _row_batch(doc: np.ndarray, length: int) -> dict:
    """One document in a row of `length` (padding after it)."""
    tokens = np.zeros((1, length), np.int32)
    seg = np.zeros((1, length), np.int32)
    tokens[0, : len(doc)], seg[0, : len(doc)] = doc, 1
    positions = np.arange(length, dtype=np.int32)[None] * (seg > 0)
    return {"tokens": tokens, "segment_ids": seg, "positions": positions}


def loss_sums(model):
    """jit((batch, split_at) -> (loss sum, targets, the same from split_at on)): one
    compilation per row length, whatever `split_at`."""

    @jax.jit
    def sums(batch, split_at):
        logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
        total, count = lm_loss(logits, batch)
        early = jnp.arange(batch["segment_ids"].shape[1]) < split_at
        late = {**batch, "segment_ids": jnp.where(early, 0, batch["segment_ids"])}
        late_total, late_count = lm_loss(logits, late)
        return total, count, late_total, late_count

    return sums


def document_losses(sums, docs, length: int, split_at: int | None = None) -> dict:
    """Mean next-token loss over the documents (and over positions >= split_at)."""
    totals = np.zeros(4)
    for doc in docs:
        out = sums(_row_batch(doc, length), length if split_at is None else split_at)
        totals += np.asarray([float(x) for x in out])
    out = {"loss": totals[0] / max(totals[1], 1), "targets": int(totals[1])}
    if split_at is not None:
        out["loss_late"] = totals[2] / max(totals[3], 1)
    return out


def run(*, smoke=False, steps=300, seq_len=2048, batch_size=2, window=256, long_len=LONG,
        max_docs=64, short_len=SHORT) -> dict:  # fmt: skip
    """Train and evaluate every variant; returns per-variant results."""
    configs = variant_configs(
        smoke=smoke, steps=steps, seq_len=seq_len, batch_size=batch_size, window=window
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            workdir = os.path.join(tmp, name)
            t0 = time.perf_counter()
            last = train_and_evaluate(config, workdir)
            wall = time.perf_counter() - t0
            exp = Experiment(config, workdir)
            state = exp.restore_or_init()
            exp.checkpointer.close()
            model = nnx.merge(exp.graphdef, state.params)
            short, long = eval_rows(
                config, workdir, long_len=long_len, max_docs=max_docs, short_len=short_len
            )
            sums = loss_sums(model)
            results[name] = {
                "params": param_count(TransformerConfig(**config.model)),
                "train_loss": last["loss"],
                "tokens": last["tokens_seen"],
                "train_seconds": wall,
                "short": document_losses(sums, short, short_len),
                "long": document_losses(sums, long, long_len, split_at=seq_len),
                "num_short": len(short),
                "num_long": len(long),
            }
    return {
        "settings": dict(
            steps=steps,
            seq_len=seq_len,
            batch_size=batch_size,
            window=window,
            long_len=long_len,
            short_len=short_len,
        ),  # fmt: skip
        "results": results,
    }


def markdown_table(result: dict) -> str:
    """The BENCHMARKS.md table."""
    s = result["settings"]
    lines = [
        f"| model | params | train loss | train s | eval loss, docs < {SHORT} | "
        f"eval loss, docs > {LONG} (first {s['long_len']}) | same, positions >= {s['seq_len']} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['train_loss']:.3f} | {r['train_seconds']:.0f} | "
            f"{r['short']['loss']:.3f} ({r['num_short']} docs) | "
            f"{r['long']['loss']:.3f} ({r['num_long']} docs) | {r['long']['loss_late']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--long_len", type=int, default=LONG)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    kwargs = vars(args).copy()
    if args.smoke:
        kwargs.update(steps=2, seq_len=64, batch_size=2, window=16, long_len=128, max_docs=2,
                      short_len=128)  # fmt: skip
    result = run(**kwargs)
    command = "python benchmarks/lact_compare.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"`{command.strip()}` on {jax.devices()[0].device_kind}, {os.cpu_count()} cores\n")
    print(", ".join(f"{k}={v}" for k, v in result["settings"].items()) + "\n")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
