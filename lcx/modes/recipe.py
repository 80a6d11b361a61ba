"""`--config.mode=recipe`: the stages of `config.recipe`, in order, in one workdir, resuming
at the stage a killed run was in (lcx.posttrain.recipe; configs/prolong_tiny.py)."""

from lcx.evals.cli import RESULTS
from lcx.posttrain.recipe import run_recipe

# run(config, workdir) -> {"stages": [each stage's record], "workdir": workdir}
run = run_recipe


def summary(result: dict, workdir: str) -> str:
    """Each stage's step and eval loss, and where the stages are."""
    parts = []
    for record in result["stages"]:
        loss = record.get("eval_loss")
        loss = f", eval loss {loss:.4f}" if isinstance(loss, float) else ""
        parts.append(f"{record['name']} (step {record['step']}{loss})")
    return f"lcx: recipe stages done: {'; '.join(parts)}; in {workdir}/<k>-<name>, {RESULTS} each"
