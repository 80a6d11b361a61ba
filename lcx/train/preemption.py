"""Stopping cleanly on SIGINT / SIGTERM: finish the step, checkpoint, say so, exit non-zero.

A cluster scheduler or a TPU preemption sends SIGTERM; a person presses Ctrl-C (SIGINT).
`StopSignals` turns the first of either into a request the training loop honours after
the step in flight: it writes a checkpoint at that step, waits for it, prints one line
and raises `Interrupted`, which the command line turns into exit status 128 + signal. A
second signal exits at once. In a multi-process run (`jax.distributed`) every process
must stop after the same step, or the ones still training wait forever on the others'
collectives: each step the processes gather their signals (one small
`multihost_utils.process_allgather`), so a signal to any one stops them all. JAX's own
preemption notifier cannot serve here, as the Python handler replaces its SIGTERM
handler; its sync point (`reached_preemption_sync_point`) still stops every process
where a scheduler's notice reaches the coordination service another way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np

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
        """Whether to stop after `step`: a signal to any process, or a preemption notice.

        In a multi-process run every process must call this at every step: it is a
        collective, and they all get the same answer.
        """
        if jax.process_count() == 1:
            return self.signum is not None
        # Decided from the gathered values alone: a signal that lands during the gather
        # counts at the next step, on every process alike.
        signums = _gather_signums(self.signum or 0)
        if signums.any():
            self.signum = self.signum or int(signums.max())
            return True
        if _preemption_sync_point(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False


def _gather_signums(signum: int) -> np.ndarray:
    """Every process's signal number (0: none), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int32(signum))).reshape(-1)


def _preemption_sync_point(step: int) -> bool:
    """JAX's multi-process preemption agreement; False where the service is not running."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # jax.distributed without the preemption service
        return False
