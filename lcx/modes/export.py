"""`--config.mode=export --config.export.dir=OUT`: a workdir's latest checkpoint as a
Hugging Face directory (weights, config.json and, for a Hugging Face tokenizer, its files)."""

from __future__ import annotations

from lcx.errors import UserError
from lcx.settings import resolve
from lcx.train.restore import export_workdir


def run(config, workdir: str) -> dict:
    """Write the latest checkpoint's parameters to `config.export.dir`; a summary record."""
    config = resolve(config)
    out = config.export.dir
    if not out:
        raise UserError("export.dir is empty: give --config.export.dir=OUT, a new directory")
    return {"step": export_workdir(config, workdir, out), "dir": out}


def summary(result: dict, workdir: str) -> str:
    """The checkpoint's step and the directory it was written to."""
    del workdir
    return f"lcx: step {result['step']} written as a Hugging Face model to {result['dir']}"
