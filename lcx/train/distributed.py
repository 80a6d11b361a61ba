"""Multi-process runs through JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program over its local devices; GSPMD places the global
arrays. `initialize` starts the runtime from explicit flags (one machine, a cluster
without a scheduler JAX knows) or, with no flags, lets JAX discover the topology on a
TPU pod slice or under SLURM; a single process needs nothing. Each process then reads
its own shard of the data (`lcx.train.input.make_dataset`), process 0 writes metrics,
and orbax writes one distributed checkpoint.
"""

from __future__ import annotations

import os
import socket
import time

import jax

from lcx.errors import UserError

# Environment variables that say JAX can find the other processes by itself.
CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 60,
    heartbeat_s: int = 20,
) -> bool:
    """Start `jax.distributed` when this is one of several processes; whether it did.

    `timeout_s` bounds the wait for every process to connect (an unreachable
    coordinator is an error after it); `heartbeat_s` bounds how long a process waits
    on one that died before it fails too.
    """
    given = (coordinator_address, num_processes, process_id)
    if all(x is None for x in given):
        if not any(os.environ.get(k) for k in CLUSTER_HINTS) or _single_slurm_task():
            return False
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    if num_processes is None or process_id is None or coordinator_address is None:
        raise UserError(
            "--coordinator_address, --num_processes and --process_id go together; got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
            f"process_id={process_id}"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
        )
    if ":" not in coordinator_address:
        raise UserError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT")
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_s,
        )
    except Exception as e:  # XLA's runtime errors: deadline exceeded, refused, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"process {process_id} of {num_processes} could not join the coordinator at "
            f"{coordinator_address} within {timeout_s} s: {first}"
        ) from None
    return True


def _wait_for_coordinator(address: str, timeout_s: int, process_id: int, num_processes: int):
    """Return once `address` accepts a TCP connection; ValueError after `timeout_s`.

    Checked here because XLA's client aborts the whole process (no exception) when it
    cannot connect.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"process {process_id} of {num_processes} could not join the coordinator "
                    f"at {address} within {timeout_s} s: {e.strerror or e}"
                ) from None
            time.sleep(0.25)


def _single_slurm_task() -> bool:
    """A SLURM job of one task: nothing to connect."""
    return os.environ.get("SLURM_NTASKS", "1") == "1" and "TPU_WORKER_HOSTNAMES" not in os.environ


def is_main_process() -> bool:
    """Process 0: the one that writes metrics and prints progress."""
    return jax.process_index() == 0
