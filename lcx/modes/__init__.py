"""The command line's modes: one module per `config.mode`, each with
`run(config, workdir) -> dict` (a record of what it did) and
`summary(result, workdir) -> str` (the one line `python -m lcx.main` prints after it).

A new mode is its module plus one line in MODES.
"""

import types

from lcx.errors import UserError
from lcx.modes import eval, evaluate, export, generate, recipe, self_lengthen, serve, train
from lcx.settings import resolve

MODES = types.MappingProxyType(
    {
        "train": train,
        "eval": eval,
        "generate": generate,
        "evaluate": evaluate,
        "export": export,
        "recipe": recipe,
        "self_lengthen": self_lengthen,
        "serve": serve,
    }
)


def mode_of(name: str):
    """The module of `config.mode=name`, or a one-line UserError listing the valid modes."""
    if name not in MODES:
        raise UserError(f"config.mode={name!r}; valid: {', '.join(MODES)}")
    return MODES[name]


def run(config, workdir: str) -> dict:
    """Run `config.mode` as `python -m lcx.main` does; the mode's result record."""
    config = resolve(config)
    return mode_of(config.mode).run(config, workdir)
