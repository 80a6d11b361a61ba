"""Train-step time and real tokens/s of the tiny model on 1, 2, 4 and 8 CPU devices.

    python benchmarks/scaling.py            # the BENCHMARKS.md table
    python benchmarks/scaling.py --smoke    # seconds

Each device count runs in its own process (`--xla_force_host_platform_device_count`):
data parallel (`mesh.data = n`, a fixed global batch of rows) and sequence parallel
(`mesh.sequence = n`: ring attention over rows of `--long_len` tokens in the balanced
layout). The model has lm_tiny's shape in float32; rows are packed with documents of
exponential length (mean `--mean_document`); real tokens exclude padding. Median of
`--repeats` steps after a compile step. Host devices share this machine's cores, so the
table shows what the same code costs when split, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, statistics, sys, time
import jax, numpy as np
from configs import lm_tiny
from lcx.attention.ring import sequence_layout
from lcx.model import TransformerConfig
from lcx.train import sharding as sh, step as steplib
from lcx.settings import resolve
from lcx.train.optimizer import OptimizerConfig, ScheduleConfig, make_optimizer, make_schedule

args = json.loads(sys.argv[1])
c = lm_tiny.get_config("smoke" if args["smoke"] else None)
c.model.dtype = "float32"
rules = tuple(tuple(r) for r in c.sharding_rules)
model_cfg = TransformerConfig(**c.model)
b, t, n = args["rows"], args["length"], jax.device_count()
settings = resolve(c)
tx = make_optimizer(OptimizerConfig.of(settings.optimizer), make_schedule(
    ScheduleConfig.of(settings.schedule), total_steps=100, batch_size=b, seq_len=t))
graphdef, _ = steplib.abstract_model(model_cfg)
rng = np.random.default_rng(0)
seg = np.zeros((b, t), np.int32); pos = np.zeros_like(seg)
for r in range(b):
    at, doc = 0, 1
    while at < t:
        k = min(t - at, 1 + int(rng.exponential(args["mean_document"])))
        seg[r, at:at + k], pos[r, at:at + k] = doc, np.arange(k)
        at, doc = at + k, doc + 1
batch = {"tokens": rng.integers(0, 256, (b, t)).astype(np.int32), "segment_ids": seg,
         "positions": pos}
shape = dict(data=1, sequence=n) if args["mode"] == "sequence" else dict(data=n)
mesh = sh.make_mesh(sh.MeshShape(**shape))
if args["mode"] == "sequence" and n > 1:
    batch = sequence_layout(batch, n, "balanced")
shardings = steplib.state_shardings(model_cfg, tx, mesh, rules)
state = steplib.init_state(model_cfg, tx, 0, shardings, b)
batch_sharding = sh.batch_sharding(mesh, rules)
step = steplib.make_train_step(graphdef, tx, shardings, batch_sharding, t)
device_batch = sh.put_batch(batch, batch_sharding)
times = []
with jax.set_mesh(mesh):
    for i in range(args["repeats"] + 1):
        start = time.perf_counter()
        state, metrics = step(state, device_batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
real, median = int((seg != 0).sum()), statistics.median(times[1:])
print("RESULT", json.dumps({"step_s": median, "min": min(times[1:]), "max": max(times[1:]),
                            "tokens_per_s": real / median}))
"""


def run(devices, mode, rows, length, args):
    """One configuration in a fresh process; its result dict."""
    spec = dict(mode=mode, rows=rows, length=length, repeats=args.repeats,
                mean_document=args.mean_document, smoke=args.smoke)  # fmt: skip
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--devices", default=None, help="default 1,2,4,8 (smoke: 1,2)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--long_len", type=int, default=8192)
    parser.add_argument("--mean_document", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.seq_len, args.long_len, args.repeats = 4, 32, 64, 1
    args.devices = args.devices or ("1,2" if args.smoke else "1,2,4,8")
    results = {}
    for n in [int(x) for x in args.devices.split(",")]:
        results["data", n] = run(n, "data", args.rows, args.seq_len, args)
        results["sequence", n] = run(n, "sequence", 1, args.long_len, args)
    print("\n`" + " ".join(["python benchmarks/scaling.py", *(argv or sys.argv[1:])]) + "`" + "\n")
    print("| parallelism | devices | rows x tokens | step s (min–max) | real tokens/s |")
    print("|---|---|---|---|---|")
    for (mode, n), r in results.items():
        shape = f"{args.rows} x {args.seq_len}" if mode == "data" else f"1 x {args.long_len:,}"
        print(
            f"| {mode} | {n} | {shape} | {r['step_s']:.3f} ({r['min']:.3f}–{r['max']:.3f}) | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    return results


if __name__ == "__main__":
    main()
