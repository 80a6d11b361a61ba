"""lcx: packed long-context language-model training and serving in JAX.

`import lcx` is cheap: the subpackages (`lcx.attention`, `lcx.data`, `lcx.packing`,
`lcx.optim`, `lcx.ttt`, `lcx.train`, `lcx.model`, ...) load on first use.
"""

import importlib

__version__ = "0.1.0"

SUBMODULES = (
    "attention",
    "cache",
    "checkpoints",
    "colab",
    "config_loading",
    "data",
    "errors",
    "evals",
    "generate",
    "layers",
    "lora",
    "model",
    "modes",
    "optim",
    "packing",
    "plots",
    "runtime",
    "train",
    "ttt",
)
__all__ = list(SUBMODULES)


def __getattr__(name):
    """Import a subpackage on first access (PEP 562)."""
    if name in SUBMODULES:
        return importlib.import_module(f"lcx.{name}")
    raise AttributeError(f"module 'lcx' has no attribute {name!r}")
