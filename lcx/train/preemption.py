"""Stopping cleanly on SIGINT / SIGTERM: finish the step, checkpoint, say so, exit non-zero.

A cluster scheduler or a TPU preemption sends SIGTERM; a person presses Ctrl-C (SIGINT).
`StopSignals` turns the first of either into a request the training loop honours after
the step in flight: it writes a checkpoint at that step, waits for it, prints one line
and raises `Interrupted`, which the command line turns into exit status 128 + signal. A
second signal exits at once. In a multi-process run (`jax.distributed`), JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`) makes every
process stop at the same step when the coordination service saw a preemption notice.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing `step`."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + self.signum


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM requests a stop, a second exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need it
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        """First signal: remember it; second: leave now."""
        del frame
        if self.signum is not None:
            print(f"lcx: {signal.Signals(signum).name} again: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"lcx: {signal.Signals(signum).name}: stopping after this step, with a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
        )

    def requested(self, step: int) -> bool:
        """Whether to stop after `step`: a signal here, or a preemption seen by any process."""
        if self.signum is not None:
            return True
        if jax.process_count() > 1 and _preemption_sync_point(step):
            self.signum = signal.SIGTERM
            return True
        return False


def _preemption_sync_point(step: int) -> bool:
    """JAX's multi-process preemption agreement; False where the service is not running."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # jax.distributed without the preemption service
        return False
