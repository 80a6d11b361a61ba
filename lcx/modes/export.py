"""`--config.mode=export --config.export.dir=OUT`: a workdir's latest checkpoint as a
Hugging Face directory (weights, config.json and, for a Hugging Face tokenizer, its files)."""

from __future__ import annotations

import os

from lcx.checkpoints.hf import save_hf
from lcx.errors import UserError
from lcx.settings import resolve
from lcx.train.restore import restore_model


def run(config, workdir: str) -> dict:
    """Write the latest checkpoint's parameters to `config.export.dir`; a summary record."""
    config = resolve(config)
    out = config.export.dir
    if not out:
        raise UserError("export.dir is empty: give --config.export.dir=OUT, a new directory")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"export.dir={out!r} is not empty; give a new directory")
    model, step, tokenizer = restore_model(config, workdir, with_tokenizer=True)
    path = getattr(tokenizer, "path", None)
    save_hf(
        model,
        out,
        max_shard_bytes=int(config.export.max_shard_gb * (1 << 30)),
        tokenizer_dir=os.path.dirname(path) if path else None,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    return {"step": step, "dir": out}


def summary(result: dict, workdir: str) -> str:
    """The checkpoint's step and the directory it was written to."""
    del workdir
    return f"lcx: step {result['step']} written as a Hugging Face model to {result['dir']}"
