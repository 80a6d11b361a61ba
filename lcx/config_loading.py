"""Load a config file (`get_config(arg)`) by path, as ml_collections' config flags do."""

from __future__ import annotations

import importlib.util
import os


def load_config(path: str, arg: str | None = None):
    """`get_config(arg)` of the python config file at `path`."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    name = "lcx_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
