"""`--config.mode=generate`: completions of `generate.prompts` (or `generate.prompts_file`)
by WORKDIR's latest checkpoint, printed as they finish."""

from lcx.generate.cli import generate_from_workdir

# run(config, workdir) -> {step, prompts, tokens}
run = generate_from_workdir


def summary(result: dict, workdir: str) -> str:
    """The checkpoint's step and how many tokens were generated for how many prompts."""
    del workdir
    tokens, prompts = result["tokens"], result["prompts"]
    return f"lcx: step {result['step']}: {tokens} tokens for {prompts} prompts"
