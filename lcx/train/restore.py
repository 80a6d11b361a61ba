"""A trained model back from a workdir: the latest checkpoint's parameters, nothing else
(no optimizer state, no data iterator), for generation, export and evaluation."""

from __future__ import annotations

import os

from absl import logging
from flax import nnx

from lcx.errors import UserError
from lcx.settings import resolve
from lcx.train import run_record
from lcx.train import step as steplib
from lcx.train.checkpoint import abstract_like
from lcx.train.loop import Experiment


def restore_model(config, workdir: str, *, with_tokenizer: bool = False):
    """The Transformer of the workdir's latest checkpoint (parameters only) and its step
    (and the run's tokenizer)."""
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
        shapes = nnx.to_pure_dict(abstract)
        params = exp.checkpointer.restore_params(step, abstract_like(shapes, exp.shardings.params))
    finally:
        exp.checkpointer.close()
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    return (model, step, exp.tokenizer) if with_tokenizer else (model, step)
