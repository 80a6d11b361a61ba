"""Write short conversations in the format of lcx's long-context tasks, as JSONL.

    python scripts/make_task_conversations.py --out configs/data/task_conversations.jsonl

The SFT stage of configs/prolong_tiny.py trains on them: each conversation is one
`lcx.evals.tasks` example at a short length (240 to 400 byte tokens) as a user turn and
its one-line answer as the assistant turn; some carry a system turn. ProLong's question
(Gao et al., arXiv 2410.02660): does supervised fine-tuning on short data bring out the
long-context ability that continued training put there? Evaluation then asks the same
tasks at longer lengths. The examples are seeded apart from evaluation's (seed 0), so no
evaluation prompt is trained on. The committed file is this script's output
(tests/test_prolong_recipe.py checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcx.data import ByteTokenizer  # noqa: E402
from lcx.evals.tasks import TAUGHT_TASKS, make_examples  # noqa: E402

LENGTHS = (240, 320, 400)
PER_TASK_AND_LENGTH = 40
SEED = 7  # evaluation draws seed 0
SYSTEM = "Answer with the value only, on one line."


def conversations(per_task_and_length: int = PER_TASK_AND_LENGTH) -> list[dict]:
    """Every task at every length, in a fixed order; every third with a system turn."""
    tokenizer = ByteTokenizer()
    out = []
    for task in sorted(TAUGHT_TASKS):
        for length in LENGTHS:
            for i, ex in enumerate(
                make_examples(task, length, per_task_and_length, SEED, tokenizer)
            ):
                turns = [{"role": "user", "content": ex.prompt}]
                turns.append({"role": "assistant", "content": ex.answer})
                if i % 3 == 0:
                    turns.insert(0, {"role": "system", "content": SYSTEM})
                out.append({"messages": turns})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--per_task_and_length", type=int, default=PER_TASK_AND_LENGTH)
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        for conversation in conversations(args.per_task_and_length):
            f.write(json.dumps(conversation) + "\n")


if __name__ == "__main__":
    main()
