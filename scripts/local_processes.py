"""Start N local processes of one lcx run, as N hosts would, for trying multi-process runs.

    python scripts/local_processes.py --processes 2 --devices_per_process 4 -- \\
        --config configs/lm_tiny.py:smoke --workdir runs/two

Each process runs `python -m lcx.main ARGS --coordinator_address=localhost:PORT
--num_processes=N --process_id=I` on the CPU with its own host devices (a free port is
picked). If one process fails or dies, the others are stopped: nothing is left running,
whatever happens, even when this script is killed (on Linux each process is SIGKILLed
when its parent dies). The exit status is the first failure's (0 when all succeed).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(args, extra, port):
    """The N processes, each in its own process group."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
    )  # fmt: skip
    procs = []
    for i in range(args.processes):
        cmd = [
            sys.executable, "-m", "lcx.main", *extra,
            f"--coordinator_address=localhost:{port}", f"--num_processes={args.processes}",
            f"--process_id={i}", f"--distributed_timeout={args.timeout}",
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                      preexec_fn=_die_with(os.getpid())))  # fmt: skip
    return procs


def _die_with(parent: int):
    """A preexec_fn: the child gets SIGKILL when `parent` dies (Linux), so a killed
    launcher (a test's timeout sends SIGKILL) leaves no run waiting on its peers."""

    def preexec():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # not Linux: stop() covers the exits Python sees
            return
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(128 + signal.SIGKILL)

    return preexec


def stop(procs):
    """Kill whatever is still running, process group and all."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=60, help="seconds to connect")
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (
        argv, [])  # fmt: skip
    args = parser.parse_args(ours)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # to stop()
    procs = start(args, extra, free_port())
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        stop(procs)


if __name__ == "__main__":
    sys.exit(main())
