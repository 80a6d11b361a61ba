"""Load a config file (`get_config(arg)`) by path, as ml_collections' config flags do."""

from __future__ import annotations

import importlib.util
import os


def load_config(path: str, arg: str | None = None):
    """`get_config(arg)` of the python config file at `path`, locked.

    Locked as on the command line: setting a key the config does not have (a typo such
    as `config.train.stepz = 8`) raises instead of adding it; values can still change.
    """
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    name = "lcx_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config
