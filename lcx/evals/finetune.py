"""Short examples of the task formats as a text corpus, for fine-tuning a small model.

    python -m lcx.evals.finetune --out runs/task_data --count 3000

ProLong (arXiv 2410.02660) finds short instruction data enough to teach a long-context
model to answer: here every file is one short example (prompt + " answer\\n") of every
task, 256-512 tokens, seeded apart from the evaluation's examples (`evals.seed`), so a
tiny model learns the formats and long-context scores then measure context use.
configs/evals_finetune.py trains on such a directory.
"""

from __future__ import annotations

import argparse
import os

from lcx.data.tokenizer import ByteTokenizer
from lcx.evals.scoring import continuation
from lcx.evals.tasks import TAUGHT_TASKS, make_example

SEED = 7_777  # examples (SEED, i): never the evaluation's (evals.seed, i) for small seeds


def write_task_corpus(
    directory: str,
    count: int,
    lengths=(256, 384, 512),
    tasks=None,
    tokenizer=None,
    seed: int = SEED,
) -> list[str]:
    """`count` examples cycling over tasks and lengths, one file each; their paths."""
    tasks, tokenizer = list(tasks or TAUGHT_TASKS), tokenizer or ByteTokenizer()
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(count):
        task, length = tasks[i % len(tasks)], lengths[(i // len(tasks)) % len(lengths)]
        example = make_example(task, length, seed * 1_000_003 + i, tokenizer)
        path = os.path.join(directory, f"{i:06d}-{task}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(example.prompt + continuation(example.answer))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a directory for the example files")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--lengths", default="256,384,512", help="prompt lengths in tokens")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    paths = write_task_corpus(args.out, args.count, lengths, seed=args.seed)
    print(f"lcx: {len(paths)} task examples in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
