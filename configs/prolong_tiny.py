"""ProLong's recipe end to end at tiny scale: pretrain, continue long, fine-tune, evaluate.

    python -m lcx.main --config configs/prolong_tiny.py --workdir runs/prolong_tiny
    python -m lcx.main --config configs/prolong_tiny.py:smoke --workdir /tmp/prolong  # seconds

One command (`mode=recipe`, lcx.modes.recipe) runs the stages in order into
WORKDIR/<k>-<name>, each starting from the model the one before exported, evaluating
after each; run it again after a kill and it resumes at the stage it was in:
0. `pretrain`: configs/lm_tiny.py's model from scratch on rows of 256 tokens (what a
   short-context base model is here);
1. `long`: continued training on rows of 1,024 tokens, beyond every evaluation length,
   with the RoPE base raised 4x, on a 60/40 mix of long documents (standard-library
   files of at least 1,024 tokens) and short ones (all of them), as ProLong mixes long
   and short data (Gao et al., "How to Train Long-Context Language Models
   (Effectively)", arXiv 2410.02660: 60% long code repositories and books, 40% short);
2. `sft`: supervised fine-tuning on short conversations only (240-400 tokens:
   configs/data/task_conversations.jsonl, scripts/make_task_conversations.py), the loss
   on the assistant turns, through the byte tokenizer's chat template;
each followed by `mode=evaluate` on the long-context tasks at 512 and 768 tokens
(prompts through the chat template after SFT). BENCHMARKS.md, "ProLong recipe", has the
scores after each stage.
"""

import os

from lcx.config_loading import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "lm_tiny.py")
CONVERSATIONS = os.path.join(HERE, "data", "task_conversations.jsonl")


def get_config(arg=None):
    """`arg`: None for the recipe (about 20 minutes on 2 CPU cores), 'smoke' for seconds."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/prolong_tiny.py takes no argument or 'smoke'; got {arg!r}")
    smoke = arg == "smoke"
    c = load_config(BASE, "smoke" if smoke else None)
    c.mode = "recipe"
    c.evals.update(
        tasks="kv_retrieval,multi_needle,variable_tracking,copy_span,icl_classification",
        lengths="512,768",
        examples=20,
        context=1024,
        loss_by_position=False,
    )
    long_rows, sft_rows = 1024, 512
    pretrain = {"train": {"steps": 300, "eval_every": 100, "checkpoint_every": 100}}
    long = {
        "init": {"rope_theta": 4 * c.model.rope_theta},
        "data": {
            "sources": [
                {"paths": "", "weight": 0.6, "min_tokens": long_rows},
                {"paths": "", "weight": 0.4, "min_tokens": 0},
            ]
        },
        "train": {
            "steps": 150,
            "batch_size": 4,
            "seq_len": long_rows,
            "eval_every": 50,
            "checkpoint_every": 50,
        },
        "schedule": {"peak_lr": 1e-3, "warmup_steps": 15},
    }
    sft = {
        "data": {"format": "chat", "paths": CONVERSATIONS, "eval_fraction": 0.05},
        "train": {
            "steps": 150,
            "batch_size": 8,
            "seq_len": sft_rows,
            "eval_every": 50,
            "checkpoint_every": 50,
            "loss_average": "token",
        },
        "schedule": {"peak_lr": 5e-4, "warmup_steps": 15},
    }
    if smoke:
        # Likelihood scores only: a two-step model generates no answer worth matching.
        c.evals.update(tasks="kv_retrieval", lengths="256", examples=2, context=512, generate=False)
        pretrain = {"train": {"steps": 2}}
        long["data"]["sources"][0]["min_tokens"] = 256
        long["train"] = {
            "steps": 2,
            "batch_size": 2,
            "seq_len": 256,
            "eval_every": 2,
            "checkpoint_every": 2,
        }
        long["schedule"]["warmup_steps"] = 1
        sft["train"] = {
            "steps": 2,
            "batch_size": 2,
            "seq_len": sft_rows,
            "eval_every": 2,
            "checkpoint_every": 2,
        }
        sft["schedule"]["warmup_steps"] = 1
    c.recipe.stages = (
        {"name": "pretrain", "config": pretrain, "evaluate": True},
        {"name": "long", "config": long, "evaluate": True},
        {"name": "sft", "config": sft, "evaluate": True},
    )
    return c
