"""Optimizer-state bytes and trainable parameters: full fine-tuning vs LoRA, computed.

    python benchmarks/lora_memory.py            # configs/lm_1b_tpu.py's shapes: BENCHMARKS.md
    python benchmarks/lora_memory.py --smoke    # the smoke shapes, seconds

Nothing is allocated or run: `jax.eval_shape` of `lcx.train.step.init_state`, the state a
run starts from, for `model.lora.rank` 0 (full fine-tuning) and each LoRA rank (all
targets: q, k, v, o, gate, up, down; alpha 16), with AdamW (`optimizer.adamw` of the
config: two float32 moments per trained parameter). Reported per variant: the trained
parameters, the optimizer state's bytes, and what a checkpoint holds (trained
parameters + optimizer state); the frozen base (LoRA) is loaded, not trained or saved.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcx.config_loading import load_config  # noqa: E402
from lcx.runtime import sharding as sh  # noqa: E402
from lcx.settings import resolve  # noqa: E402
from lcx.train import step as steplib  # noqa: E402
from lcx.train.model_source import model_config  # noqa: E402
from lcx.train.optimizer import (  # noqa: E402
    OptimizerConfig,
    ScheduleConfig,
    make_optimizer,
    make_schedule,
)

CONFIG = os.path.join(ROOT, "configs", "lm_1b_tpu.py")
RANKS = (8, 64)


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(config, rank: int) -> dict:
    """Parameters and optimizer-state bytes of `config` with model.lora.rank = `rank`."""
    config = config.copy_and_resolve_references()
    config.optimizer.name = "adamw"
    config.model.lora.rank = rank
    settings = resolve(config)
    model_cfg = model_config(settings)
    tc = settings.train
    schedule = make_schedule(
        ScheduleConfig.of(settings.schedule),
        total_steps=tc.steps,
        batch_size=tc.batch_size,
        seq_len=tc.seq_len,
    )
    tx = make_optimizer(OptimizerConfig.of(settings.optimizer), schedule)
    mesh = sh.make_mesh(sh.MeshShape(), jax.devices()[:1])
    shardings = steplib.state_shardings(model_cfg, tx, mesh, settings.sharding_rules)
    state = jax.eval_shape(lambda: steplib.init_state(model_cfg, tx, 0, shardings, tc.batch_size))
    _, abstract = steplib.abstract_model(model_cfg)
    total = sum(x.size for x in jax.tree.leaves(steplib.trainable(model_cfg, abstract)[1]))
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "variant": "full" if rank == 0 else f"LoRA r={rank}",
        "base_parameters": total or trained,
        "trained_parameters": trained,
        "optimizer_bytes": _bytes(state.opt_state),
        "checkpoint_bytes": _bytes(state.params) + _bytes(state.opt_state),
    }


def markdown_table(rows: list[dict]) -> str:
    """The BENCHMARKS.md table."""
    full = rows[0]["optimizer_bytes"]
    lines = [
        "| variant | trained parameters | share | AdamW state | vs full | checkpoint |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = r["trained_parameters"] / r["base_parameters"]
        lines.append(
            f"| {r['variant']} | {r['trained_parameters']:,} | {share:.2%} | "
            f"{r['optimizer_bytes'] / 2**20:,.1f} MiB | {r['optimizer_bytes'] / full:.2%} | "
            f"{r['checkpoint_bytes'] / 2**20:,.1f} MiB |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the smoke config's shapes")
    args = parser.parse_args(argv)
    config = load_config(CONFIG, "smoke" if args.smoke else None)
    rows = [measure(config, rank) for rank in (0, *RANKS)]
    print(f"configs/lm_1b_tpu.py{':smoke' if args.smoke else ''}, AdamW, all LoRA targets")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
