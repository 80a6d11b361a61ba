"""`--config.mode=self_lengthen`: Self-Lengthen's rounds from `init.hf_checkpoint`, into
WORKDIR/self_lengthen/ (lcx.posttrain.self_lengthen; configs/self_lengthen_tiny.py)."""

from lcx.posttrain.self_lengthen import run_self_lengthen

# run(config, workdir) -> {"rounds": [summaries], "final": {...}, "generator", "extender"}
run = run_self_lengthen


def summary(result: dict, workdir: str) -> str:
    """The Generator's mean length (words) round by round, and where the rounds are."""
    means = [r["generator"]["mean_words"] for r in result["rounds"]]
    means.append(result["final"]["generator"]["mean_words"])
    path = " -> ".join(f"{m:.1f}" for m in means)
    return (
        f"lcx: Self-Lengthen: the Generator's mean length in words, round by round: {path}; "
        f"rounds in {workdir}/self_lengthen, the last Generator in {result['generator']}"
    )
