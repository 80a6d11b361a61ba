"""Command line: `python -m lcx.main --config configs/<name>.py[:arg] --workdir DIR`.

The config is locked: `--config.train.stepz=1` is an error, not silently ignored.
User errors print one line and exit with status 2; LCX_DEBUG=1 shows the traceback.
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

MODES = ("train", "eval")


def run(config, workdir: str) -> dict:
    """Dispatch on `config.mode`."""
    from lcx import train  # imported late so `--help` stays fast

    if config.mode == "train":
        return train.train_and_evaluate(config, workdir)
    if config.mode == "eval":
        return train.evaluate_checkpoint(config, workdir)
    raise ValueError(f"config.mode={config.mode!r}; valid: {MODES}")


def _one_line(error) -> str:
    """An exception's message on one line, without any traceback text it embeds."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    if "Traceback (most recent call last)" in text:
        head, _, tail = text.partition("Traceback (most recent call last)")
        text = head + tail.strip().splitlines()[-1]
    return " ".join(text.split())


def _parse_flags(argv):
    """absl flag parsing, with config-override mistakes reported on one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"lcx: error: {_one_line(e)}")
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for a key the locked config does not have.
        key = re.search(r"'([^'\\]+)\\?'", str(e))
        hint = re.search(r"Did you mean [^?]*\?", str(e))
        name = key.group(1) if key else "?"
        sys.exit(f"lcx: error: --config has no key {name!r}. {hint.group(0) if hint else ''}")
    except (TypeError, ValueError) as e:
        sys.exit(f"lcx: error: bad --config override: {_one_line(e)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        result = run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as e:
        if os.environ.get("LCX_DEBUG"):
            raise
        print(f"lcx: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"lcx: done: {result}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
