"""Does the packing strategy or the row length change how a tiny model uses its context?

    python benchmarks/evals_compare.py            # the BENCHMARKS.md table (about 80 min, 2 cores)
    python benchmarks/evals_compare.py --smoke    # one tiny variant, half a minute

The tiny model (configs/lm_tiny.py) pretrained at equal tokens (300 steps of 4,096 row
tokens) with padded rows, first-fit packing and Dataset Decomposition at rows of 1K, and
first-fit at rows of 4K, two seeds each. Each is then fine-tuned on the same short task
examples (configs/evals_finetune.py, 256-512 tokens, 100 steps) and scored on key-value
retrieval at 1K, 2K and 4K tokens (lcx.evals: exact match of greedy generations, answer
token accuracy teacher-forced, 20 examples each); the pretrained model's held-out loss
is bucketed by token position up to 4K. Workdirs under --root are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (data overrides, train overrides) at full size; equal tokens per step (4,096).
VARIANTS = {
    "padded1k": ({"packing": "padded"}, {"seq_len": 1024, "batch_size": 4}),
    "first_fit1k": ({"packing": "first_fit"}, {"seq_len": 1024, "batch_size": 4}),
    "dd1k": ({"packing": "dd", "dd": {"min_log2": 6, "max_log2": 10}},
             {"seq_len": 1024, "batch_size": 4}),
    "first_fit4k": ({"packing": "first_fit"}, {"seq_len": 4096, "batch_size": 1}),
}  # fmt: skip


def pretrain_config(name, seed, smoke):
    """lm_tiny with one variant's packing and rows."""
    from lcx.config_loading import load_config

    c = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), "smoke" if smoke else None)
    data, train = VARIANTS[name]
    c.seed = seed
    c.data.update(data)
    c.train.update(steps=300, eval_every=0, progress=False, log_every=50, checkpoint_every=300)
    c.train.update(train)
    c.schedule.warmup_steps = 30
    if smoke:  # rows an eighth of the size
        c.train.update(steps=2, checkpoint_every=2, log_every=1, seq_len=train["seq_len"] // 8)
        if name == "dd1k":
            c.data.dd.update(max_log2=7, min_log2=5)
        c.schedule.warmup_steps = 1
    return c


def _evaluate(config, workdir, lengths, examples, loss_by_position, context):
    """mode=evaluate on `workdir`; its records."""
    from lcx.modes import run

    config.mode = "evaluate"
    config.evals.update(tasks="kv_retrieval", lengths=lengths, examples=examples, context=context,
                        position_length=context - 128, loss_by_position=loss_by_position,
                        generate=not loss_by_position, documents=64)  # fmt: skip
    path = os.path.join(workdir, "evals.jsonl")
    if os.path.exists(path):
        os.remove(path)
    run(config, workdir)
    with open(path) as f:
        return [json.loads(line) for line in f]


def one_model(root, name, seed, smoke, task_data):
    """Pretrain, export, fine-tune and evaluate one variant; its results."""
    from lcx.config_loading import load_config
    from lcx.modes import run

    base = os.path.join(root, f"{name}-s{seed}")
    done = os.path.join(base, "compare.json")
    if os.path.exists(done):  # evaluated by an earlier invocation
        with open(done) as f:
            return json.load(f, object_hook=_int_lengths)
    c = pretrain_config(name, seed, smoke)
    if not os.path.isdir(os.path.join(base, "checkpoints", str(c.train.steps))):
        run(c, base)
    hf = base + "-hf"
    if not os.path.isdir(hf):
        export = pretrain_config(name, seed, smoke)
        export.mode, export.export.dir = "export", hf
        run(export, base)
    context = 640 if smoke else 4224
    lengths = "256,512" if smoke else "1024,2048,4096"
    positions = _evaluate(pretrain_config(name, seed, smoke), base, lengths, 2, True, context)
    tuned = base + "-tasks"
    f = load_config(os.path.join(ROOT, "configs", "evals_finetune.py"), "smoke" if smoke else None)
    f.init.hf_checkpoint, f.data.paths, f.seed = hf, task_data, seed
    f.train.update(steps=2 if smoke else 100, eval_every=0, progress=False)
    if not os.path.isdir(os.path.join(tuned, "checkpoints", str(f.train.steps))):
        run(f, tuned)
    kv = _evaluate(f, tuned, lengths, 2 if smoke else 20, False, context)
    result = {
        "variant": name, "seed": seed,
        "loss_by_position": positions[-1]["buckets"],
        "kv": {r["length"]: r for r in kv if r["task"] == "kv_retrieval"},
    }  # fmt: skip
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def _int_lengths(record):
    """JSON object keys that are lengths back to ints."""
    return {int(k) if k.isdigit() else k: v for k, v in record.items()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny variant and seed")
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "evals_compare"))
    args = parser.parse_args(argv)
    from lcx.evals.finetune import write_task_corpus

    task_data = os.path.join(args.root, "task_data")
    if not os.path.isdir(task_data):
        write_task_corpus(task_data, 40 if args.smoke else 3000, tasks=["kv_retrieval"])
    names = ["first_fit1k"] if args.smoke else list(VARIANTS)
    seeds = [0] if args.smoke else [0, 1]
    results = [one_model(args.root, n, s, args.smoke, task_data) for s in seeds for n in names]
    with open(os.path.join(args.root, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))
    return results


def report(results) -> str:
    """Per variant: kv exact match and token accuracy by length, loss by position bucket
    (mean over seeds, and the seeds' values)."""
    lines = []
    lengths = sorted(next(iter(results))["kv"])
    buckets = [(b["start"], b["end"]) for b in results[0]["loss_by_position"]]
    header = ["variant"] + [f"kv EM {n}" for n in lengths] + [f"kv acc {n}" for n in lengths]
    header += [f"loss {lo}-{hi}" for lo, hi in buckets]
    lines.append(" | ".join(header))
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]

        def cell(values, digits=2):
            values = [v for v in values if v is not None]
            seeds = "/".join(f"{v:.{digits}f}" for v in values)
            return f"{np.mean(values):.{digits}f} ({seeds})" if values else "-"

        row = [name]
        row += [cell([r["kv"][n]["exact_match"] for r in runs]) for n in lengths]
        row += [cell([r["kv"][n]["answer_token_accuracy"] for r in runs]) for n in lengths]
        row += [
            cell([r["loss_by_position"][i]["loss"] for r in runs], 3) for i in range(len(buckets))
        ]
        lines.append(" | ".join(row))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
