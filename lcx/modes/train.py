"""`--config.mode=train` (the default): train, or resume, the config's model in WORKDIR."""

from lcx.train import train_and_evaluate

# run(config, workdir) -> the last step's metrics, after training to `train.steps`
run = train_and_evaluate


def summary(result: dict, workdir: str) -> str:
    """The step reached, the last losses and throughput, and where the records are."""
    if result.get("already_finished"):
        return (
            f"lcx: {workdir} already reached step {result['step']} (train.steps); raise "
            "--config.train.steps to train further"
        )
    parts = [f"lcx: trained to step {result.get('step', '?')}"]
    if "loss" in result:
        parts.append(f"loss {result['loss']:.4f}")
    if "eval_loss" in result:
        parts.append(f"eval loss {result['eval_loss']:.4f}")
    if "tokens_seen" in result:
        parts.append(f"{result['tokens_seen']:,.0f} tokens")
    if "tokens_per_sec" in result:
        parts.append(f"{result['tokens_per_sec']:,.0f} target tokens/s")
    return ", ".join(parts) + f"; checkpoints and metrics.jsonl in {workdir}"
