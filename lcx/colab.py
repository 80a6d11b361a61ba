"""Notebook setup: the repository's root, the devices, and sizes that fit them.

The first cell of every notebook in `notebooks/` installs lcx in Colab, then calls
`setup()`: it moves to the repository root (where `configs/` lives), prints the devices
and says whether an accelerator is present; `pick(cpu=..., accelerator=...)` then
chooses each size.
"""

from __future__ import annotations

import os

import jax


def repository_root(start: str | None = None) -> str:
    """The nearest directory at or above `start` (default: the working directory) that
    holds configs/lm_tiny.py."""
    path = os.path.abspath(start or os.getcwd())
    while True:
        if os.path.isfile(os.path.join(path, "configs", "lm_tiny.py")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            raise FileNotFoundError(
                f"no lcx repository (configs/lm_tiny.py) at or above {start or os.getcwd()}"
            )
        path = parent


def on_accelerator() -> bool:
    """Whether JAX runs on a TPU or GPU (else the CPU: notebooks pick small sizes)."""
    return jax.default_backend() in ("tpu", "gpu")


def pick(*, cpu, accelerator):
    """`accelerator` on a TPU or GPU, `cpu` otherwise."""
    return accelerator if on_accelerator() else cpu


def devices_summary() -> str:
    """One line: backend, device count and kind."""
    devices = jax.devices()
    return f"{jax.default_backend()}: {len(devices)} x {devices[0].device_kind}"


def setup() -> str:
    """chdir to the repository root, print the devices; the root."""
    root = repository_root()
    os.chdir(root)
    size = "full sizes" if on_accelerator() else "small CPU sizes"
    print(f"lcx at {root}; JAX {jax.__version__} on {devices_summary()}; {size}")
    return root
