"""`--config.mode=evaluate`: the `lcx.evals` tasks and the loss by position of WORKDIR's
latest checkpoint, appended to WORKDIR/evals.jsonl."""

from lcx.evals.cli import evaluate_workdir

# run(config, workdir) -> {step, records, results}
run = evaluate_workdir


def summary(result: dict, workdir: str) -> str:
    """The checkpoint's step, how many results were appended, and to which file."""
    del workdir
    step, count = result["step"], result["records"]
    return f"lcx: step {step}: {count} results appended to {result['results']}"
