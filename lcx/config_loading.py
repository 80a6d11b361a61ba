"""Load a config file (`get_config(arg)`) by path, as ml_collections' config flags do, and
say in one line what was wrong with a `--config` flag (a key the config lacks, by name)."""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

from lcx.errors import UserError, one_line


def load_config(path: str, arg: str | None = None):
    """`get_config(arg)` of the python config file at `path`, locked.

    Locked as on the command line: setting a key the config does not have (a typo such
    as `config.train.stepz = 8`) raises instead of adding it; values can still change.
    """
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    name = "lcx_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config


def flag_error(argv, error: BaseException) -> str:
    """One line for an error of command-line flag parsing.

    ml_collections raises AttributeError or KeyError for an override of a key the locked
    config lacks: the key is found by checking argv's `--config.a.b` names against the
    config. absl raises its own errors for a bad flag or value; a config file whose
    `get_config` raises arrives wrapped twice (ml_collections puts the file's traceback
    in its text, absl wraps that), and the file's own error is the message.
    """
    if isinstance(error, (AttributeError, KeyError)):
        return _unknown_override(argv) or f"bad --config override: {one_line(error)}"
    wrapped = error.__cause__ or error.__context__
    inner = wrapped and (wrapped.__cause__ or wrapped.__context__)
    return f"--config: {one_line(inner)}" if inner else one_line(error)


def _unknown_override(argv, flag: str = "config") -> str | None:
    """The message for the first `--config.a.b` override of argv whose key the config
    (the file `--config` names) lacks; None when every key exists."""
    spec = None
    for i, item in enumerate(argv):
        if item in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
            spec = argv[i + 1]
        elif item.startswith((f"--{flag}=", f"-{flag}=")):
            spec = item.split("=", 1)[1]
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    config = load_config(path, arg or None)
    for item in argv:
        for prefix in (f"--{flag}.", f"-{flag}.", f"--no{flag}.", f"-no{flag}."):
            if item.startswith(prefix):
                missing = _missing_key(config, item[len(prefix) :].split("=", 1)[0], flag)
                if missing:
                    return missing
    return None


def _missing_key(config, dotted: str, flag: str) -> str | None:
    """The message for the first key of `dotted` (a.b.c) missing from `config`, or None."""
    node, where = config, flag
    for key in dotted.split("."):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"--{flag}.{dotted}: {where} has no key {key!r}{hint}"
        node, where = node[key], f"{where}.{key}"
    return None
