"""Long-context evaluation: synthetic tasks at exact lengths, scorers, loss by position.

`make_examples(task, length, count, seed, tokenizer)` builds prompts (`TASKS`);
`score_examples(lm, tokenizer, examples)` scores a `LanguageModel` (`TransformerLM` wraps
an lcx Transformer); `loss_by_position` buckets held-out losses by token position;
`--config.mode=evaluate` runs `config.evals` on a workdir (lcx.evals.cli), with
`evals.length` the length-following report (lcx.evals.length_following).
"""

from lcx.evals.positions import BUCKETS, loss_by_position, plot_loss_by_position
from lcx.evals.scoring import (
    LanguageModel,
    TransformerLM,
    first_line,
    prompt_ids,
    score_examples,
    split_ids,
    string_match_all,
)
from lcx.evals.tasks import (
    TASKS,
    TAUGHT_TASKS,
    Example,
    make_example,
    make_examples,
    prompt_length,
)

__all__ = [
    "BUCKETS",
    "TASKS",
    "TAUGHT_TASKS",
    "Example",
    "LanguageModel",
    "TransformerLM",
    "first_line",
    "loss_by_position",
    "make_example",
    "make_examples",
    "plot_loss_by_position",
    "prompt_ids",
    "prompt_length",
    "score_examples",
    "split_ids",
    "string_match_all",
]
