"""Command line: `python -m lcx.main --config configs/<name>.py[:arg] --workdir DIR`.

Several processes (one per host, or `scripts/local_processes.py` on one machine) add
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; on a TPU pod slice
or under SLURM JAX finds the others without flags (lcx.train.distributed).

The config is locked: `--config.train.stepz=1` is an error, not silently ignored.
User errors (a bad flag, config value, path or workdir) print one line and exit with
status 2; LCX_DEBUG=1 shows the traceback. SIGINT / SIGTERM stop training after the
step in flight with a checkpoint, one line, and status 128 + the signal's number.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 60, "Seconds to wait for every process to connect."
)

MODES = ("train", "eval", "generate", "export", "evaluate")
USER_ERROR = 2  # the exit status of every mistake a user can fix


def run(config, workdir: str) -> dict:
    """Dispatch on `config.mode`."""
    from lcx import train  # imported late so `--help` stays fast

    if config.mode == "train":
        return train.train_and_evaluate(config, workdir)
    if config.mode == "eval":
        return train.evaluate_checkpoint(config, workdir)
    if config.mode == "generate":
        from lcx.generate.cli import generate_from_workdir

        return generate_from_workdir(config, workdir)
    if config.mode == "evaluate":
        from lcx.evals.cli import evaluate_workdir

        return evaluate_workdir(config, workdir)
    if config.mode == "export":
        from lcx.checkpoints.export import export_from_workdir

        return export_from_workdir(config, workdir)
    raise ValueError(f"config.mode={config.mode!r}; valid: {MODES}")


def _one_line(error) -> str:
    """An exception's message on one line, without any traceback text it embeds."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    if "Traceback (most recent call last)" in text:
        head, _, tail = text.partition("Traceback (most recent call last)")
        text = head + tail.strip().splitlines()[-1]
    return " ".join(text.split())


def _user_error(message: str):
    """Print one line and exit with USER_ERROR."""
    print(f"lcx: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR)


def _parse_flags(argv):
    """absl flag parsing, with config-override mistakes reported on one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _user_error(_one_line(e))
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for a key the locked config does not have.
        key = re.search(r"'([^'\\]+)\\?'", str(e))
        hint = re.search(r"Did you mean [^?]*\?", str(e))
        name = key.group(1) if key else "?"
        _user_error(f"--config has no key {name!r}. {hint.group(0) if hint else ''}".strip())
    except (TypeError, ValueError) as e:
        _user_error(f"bad --config override: {_one_line(e)}")


def summary(result: dict, workdir: str, mode: str) -> str:
    """One readable line about a finished run or evaluation."""
    if mode == "eval":
        return f"lcx: step {result['step']}: eval loss {result['eval_loss']:.4f}"
    if mode == "evaluate":
        step, count = result["step"], result["records"]
        return f"lcx: step {step}: {count} results appended to {result['results']}"
    if mode == "export":
        return f"lcx: step {result['step']} written as a Hugging Face model to {result['dir']}"
    if mode == "generate":
        tokens, prompts = result["tokens"], result["prompts"]
        return f"lcx: step {result['step']}: {tokens} tokens for {prompts} prompts"
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


def main(argv):
    if len(argv) > 1:
        _user_error(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from lcx.train.preemption import Interrupted

    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        from lcx.train import distributed

        distributed.initialize(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
            timeout_s=_INIT_TIMEOUT.value,
        )  # fmt: skip
        result = run(config, workdir)
    except Interrupted as e:
        print(
            f"lcx: {e}; checkpoint of step {e.step} written to {workdir}/checkpoints; run the "
            "same command again to resume",
            file=sys.stderr,
        )
        sys.exit(e.exit_status)
    except (ValueError, OSError) as e:
        if os.environ.get("LCX_DEBUG"):
            raise
        _user_error(_one_line(e))
    except KeyboardInterrupt:  # outside training (training checkpoints and stops instead)
        print("lcx: interrupted", file=sys.stderr)
        sys.exit(128 + 2)
    if distributed.is_main_process():
        print(summary(result, workdir, config.mode))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
