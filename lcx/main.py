"""Command line: `python -m lcx.main --config configs/<name>.py[:arg] --workdir DIR`.

Runs `config.mode` (lcx.modes.MODES); `--coordinator_address`, `--num_processes` and
`--process_id` join several processes. A user error (lcx.errors) prints one line, exit status 2
(LCX_DEBUG=1: the traceback); SIGINT / SIGTERM stop training with a checkpoint, 128 + signum.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lcx import errors
from lcx.config_loading import flag_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (locked).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 60, "Seconds to wait for the others.")


def _parse_flags(argv):
    """absl flag parsing; a bad flag, or a --config key the config lacks, is one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:  # the last two from ml_collections
        errors.exit_with(flag_error(argv, e))


def main(argv):
    if len(argv) > 1:
        errors.exit_with(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from lcx import modes, settings  # imported late so `--help` stays fast
    from lcx.train import distributed, preemption

    workdir = _WORKDIR.value
    try:
        config = settings.resolve(_CONFIG.value)  # a missing or unknown key: one line
        mode = modes.mode_of(config.mode)
        processes = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        distributed.initialize(*processes, timeout_s=_TIMEOUT.value)
        result = mode.run(config, workdir)
    except preemption.Interrupted as e:
        where = f"checkpoint of step {e.step} written to {workdir}/checkpoints"
        print(f"lcx: {e}; {where}; run the same command again to resume", file=sys.stderr)
        sys.exit(e.exit_status)
    except (errors.UserError, OSError) as e:
        errors.exit_with(errors.one_line(e), error=e)
    except KeyboardInterrupt:  # outside training (training checkpoints and stops instead)
        print("lcx: interrupted", file=sys.stderr)
        sys.exit(128 + 2)
    if distributed.is_main_process():
        print(mode.summary(result, workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
