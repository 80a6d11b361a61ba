"""Write the synthetic instruction family Self-Lengthen is shown on at tiny scale.

    python scripts/make_lengthen_data.py --out configs/data

A model trained from scratch on Python's standard library cannot write prose, so the
long-output experiment of configs/self_lengthen_tiny.py runs on a family where
lengthening is learnable by a tiny byte-level model: "Write about the <topic>." answered
in a paragraph of simple sentences about the topic, built from small word lists
(verbs, adjectives, nouns), so a good response is any number of well-formed sentences,
every sentence ends in a period, and a repeated 13-gram would only come from looping.
- `lengthen_seed.jsonl`: the seed conversations the starting model is fine-tuned on,
  with short responses (2 to 4 sentences in one paragraph: a response's end is then
  learnable from its sentences alone, where a second paragraph taught the first seed
  model to stop inside it, and the one-paragraph extensions never ended); what the
  Generator writes before any round; and, one in three, the Extender's task
  (`lcx.posttrain.self_lengthen.ENRICH_PROMPT` over the start of a response, answered by
  that start with a new sentence after each of its sentences), which the paper's
  starting point, an instruction-tuned model, can already do;
- `lengthen_instructions.jsonl`: the instructions the rounds run on (other topics'
  wordings than the seed's), half of them asking for a number of words
  (`required_words`, scored with LongBench-Write's S_l).
The committed files are this script's output (tests/test_self_lengthen_rounds.py checks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcx.posttrain.self_lengthen import ENRICH_PROMPT  # noqa: E402

TOPICS = (
    "river stone cloud maple copper lantern orbit velvet harbor meadow quartz ember "
    "falcon willow canyon breeze marble summit pepper garnet thistle cobalt juniper "
    "prairie glacier saffron tundra walnut indigo coral lichen basalt"
).split()
NOUNS = "bird child farmer sailor fox wind rain lamp road bell tree ship wall cart gate".split()
VERBS = "watches follows paints guards crosses visits finds carries hears greets".split()
ADJECTIVES = "quiet bright old cold warm small tall dark green golden calm wild".split()
TIMES = "dawn noon dusk night".split()
TEMPLATES = (
    "The {t} is {a}.",
    "The {a} {n} {v} the {t}.",
    "Every {n} {v} the {t} at {time}.",
    "The {t} and the {n} are {a}.",
    "At {time} the {t} looks {a} to the {n}.",
    "One {n} {v} the {a} {t} near the {n2}.",
)
INSTRUCTIONS = ("Write about the {t}.", "Describe the {t}.", "Tell me about the {t}.")


def sentence(rng, topic: str) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    nouns = rng.choice(NOUNS, 2, replace=False)
    return template.format(
        t=topic,
        n=nouns[0],
        n2=nouns[1],
        v=VERBS[rng.integers(len(VERBS))],
        a=ADJECTIVES[rng.integers(len(ADJECTIVES))],
        time=TIMES[rng.integers(len(TIMES))],
    )


def response(rng, topic: str, sentences: int) -> str:
    """`sentences` sentences about `topic` in one paragraph."""
    return " ".join(sentence(rng, topic) for _ in range(sentences))


def seed_conversations(count: int = 900, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        topic = TOPICS[rng.integers(len(TOPICS))]
        ask = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))].format(t=topic)
        if i % 3 == 2:  # the Extender's task: enrich the start of a response
            start = [sentence(rng, topic) for _ in range(int(rng.integers(1, 4)))]
            richer = " ".join(f"{s} {sentence(rng, topic)}" for s in start)
            turns = [ENRICH_PROMPT.format(instruction=ask, text=" ".join(start)), richer]
        else:
            turns = [ask, response(rng, topic, int(rng.integers(2, 5)))]
        roles = ({"role": "user", "content": turns[0]}, {"role": "assistant", "content": turns[1]})
        out.append({"messages": list(roles)})
    return out


def instructions(count: int = 96, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        ask = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))].format(t=topic)
        if i % 2:
            words = int(rng.choice([40, 60, 80]))
            out.append(
                {"instruction": ask[:-1] + f" in about {words} words.", "required_words": words}
            )
        else:
            out.append({"instruction": ask})
    return out


def write(path: str, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "lengthen_seed.jsonl"), seed_conversations())
    write(os.path.join(args.out, "lengthen_instructions.jsonl"), instructions())


if __name__ == "__main__":
    main()
