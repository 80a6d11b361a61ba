"""Self-Lengthen at tiny scale: a seed model, then three rounds of lengthening.

    python -m lcx.main --config configs/self_lengthen_tiny.py --workdir runs/self_lengthen_tiny
    python -m lcx.main --config configs/self_lengthen_tiny.py:smoke --workdir /tmp/sl  # a minute

Self-Lengthen (Quan et al., arXiv 2410.23933) grows a model's output length with no
outside data. A byte-level model trained on Python's standard library cannot write the
prose the paper lengthens, so this runs on a synthetic instruction family where
lengthening is learnable (scripts/make_lengthen_data.py: "Write about the <topic>."
answered in a paragraph of simple sentences), as a recipe (`mode=recipe`):
0. `seed`: a small model fine-tuned from scratch on the seed conversations (short
   responses, and the Extender's "enrich" task), the instruction-following model both
   roles start from;
1. `lengthen` (`mode=self_lengthen`): three rounds on configs/data/
   lengthen_instructions.jsonl, each writing WORKDIR/1-lengthen/self_lengthen/
   round_K.jsonl and round_K.summary.json, both roles fine-tuned on the accepted
   extensions every round.
BENCHMARKS.md, "Self-Lengthen", has the rounds' lengths, filters and S_l.
"""

import os

from lcx.config_loading import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "lm_tiny.py")
SEED = os.path.join(HERE, "data", "lengthen_seed.jsonl")
INSTRUCTIONS = os.path.join(HERE, "data", "lengthen_instructions.jsonl")


def get_config(arg=None):
    """`arg`: None for the experiment, 'smoke' for a one-round run at smoke size."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/self_lengthen_tiny.py takes no argument or 'smoke'; got {arg!r}")
    smoke = arg == "smoke"
    c = load_config(BASE, "smoke" if smoke else None)
    c.mode = "recipe"
    if not smoke:  # a quarter of lm_tiny's width: the family's language is small
        c.model.update(d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
    c.data.update(format="chat", paths=SEED, eval_fraction=0.05)
    c.train.update(steps=300, batch_size=8, seq_len=1024, eval_every=100, checkpoint_every=100)
    c.schedule.update(peak_lr=2e-3, warmup_steps=30)
    c.self_lengthen.update(
        instructions=INSTRUCTIONS,
        rounds=3,
        samples=2,  # the paper's k
        retries=3,
        max_new_tokens=1536,  # bytes: room for about 250 words
        temperature=1.0,  # the model's own distribution: lower overshoots its lengths
        epochs=8.0,  # the paper's 4 passes over 5,000 instructions; 96 need more
    )
    c.self_lengthen.finetune = {  # each role, each round: from its last model
        # Rows hold the Extender's prompt (a whole source) and its longer rewrite.
        "train": {"seq_len": 4096, "batch_size": 2, "eval_every": 1000, "checkpoint_every": 1000},
        "schedule": {"peak_lr": 5e-4, "warmup_steps": 2},
    }
    if smoke:
        c.train.update(steps=2, batch_size=2, eval_every=2, checkpoint_every=2)
        c.schedule.warmup_steps = 1
        c.self_lengthen.update(rounds=1, samples=1, retries=1, max_new_tokens=16, epochs=0.0)
        c.self_lengthen.finetune = {"train": {"steps": 1, "eval_every": 1, "checkpoint_every": 1}}
    c.recipe.stages = (
        {"name": "seed", "config": {}, "evaluate": False},
        {"name": "lengthen", "config": {"mode": "self_lengthen"}, "evaluate": True},
    )
    return c
