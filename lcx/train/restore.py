"""A trained model back from a workdir: the latest checkpoint's parameters, nothing else
(no optimizer state, no data iterator), for generation, export and evaluation. A LoRA
run's adapters come back folded into its frozen base (`lcx.lora`)."""

from __future__ import annotations

import dataclasses
import os

from absl import logging
from flax import nnx

from lcx import lora
from lcx.errors import UserError
from lcx.settings import resolve
from lcx.train import run_record
from lcx.train import step as steplib
from lcx.train.checkpoint import abstract_like
from lcx.train.loop import Experiment


def restore_model(config, workdir: str, *, with_tokenizer: bool = False):
    """The Transformer of the workdir's latest checkpoint (parameters only) and its step
    (and the run's tokenizer). With model.lora: the plain model W + (alpha / rank) A B of
    the checkpoint's adapters and the run's frozen base."""
    config = resolve(config)
    missing = f"--workdir {workdir!r} has no checkpoint to generate from; train first"
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(missing)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax's notes on opening a checkpoint read-only
    try:
        exp = Experiment(config, workdir, read_only=True)
    finally:
        logging.set_verbosity(verbosity)
    try:
        run_record.check_model(config, workdir)
        step = exp.resume_step
        if step is None:
            raise UserError(missing)
        graphdef, abstract = steplib.abstract_model(exp.model_cfg)
        shapes = steplib.trainable(exp.model_cfg, nnx.to_pure_dict(abstract))[0]
        params = exp.checkpointer.restore_params(step, abstract_like(shapes, exp.shardings.params))
    finally:
        exp.checkpointer.close()
    if exp.model_cfg.lora is not None:
        params = lora.merge_adapters(lora.join(params, exp.frozen_params()), exp.model_cfg.lora)
        graphdef, abstract = steplib.abstract_model(dataclasses.replace(exp.model_cfg, lora=None))
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    return (model, step, exp.tokenizer) if with_tokenizer else (model, step)


def export_workdir(config, workdir: str, out: str, *, max_shard_gb: float | None = None) -> int:
    """Write the workdir's latest checkpoint to `out` (a new or empty directory) as a
    Hugging Face model: weights, config.json and, for a Hugging Face tokenizer, its
    files; the checkpoint's step. `mode=export`, and every hand-over between the stages
    of a recipe or the rounds of Self-Lengthen."""
    from lcx.checkpoints.hf import save_hf

    config = resolve(config)
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"export.dir={out!r} is not empty; give a new directory")
    model, step, tokenizer = restore_model(config, workdir, with_tokenizer=True)
    path = getattr(tokenizer, "path", None)
    gb = config.export.max_shard_gb if max_shard_gb is None else max_shard_gb
    save_hf(
        model,
        out,
        max_shard_bytes=int(gb * (1 << 30)),
        tokenizer_dir=os.path.dirname(path) if path else None,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    return step
