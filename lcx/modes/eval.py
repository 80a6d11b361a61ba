"""`--config.mode=eval`: the held-out loss of WORKDIR's latest checkpoint."""

from lcx.train import evaluate_checkpoint

# run(config, workdir) -> {step, eval_loss}, also appended to metrics.jsonl
run = evaluate_checkpoint


def summary(result: dict, workdir: str) -> str:
    """The step evaluated and its loss."""
    del workdir
    return f"lcx: step {result['step']}: eval loss {result['eval_loss']:.4f}"
