"""The training and evaluation loops: `train_and_evaluate(config, workdir)`.

Metrics are read one step late so the host never waits on the step it just
dispatched; tokens/s counts real (non-padding) target tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import tempfile

import jax

from lcx import optim
from lcx.model import TransformerConfig
from lcx.train import input as data_input
from lcx.train import sharding as sh
from lcx.train import step as steplib
from lcx.train.checkpoint import Checkpointer, abstract_like
from lcx.train.metrics import MetricsWindow, MetricsWriter, Progress
from lcx.train.optimizer import OptimizerConfig, ScheduleConfig, make_optimizer, make_schedule
from lcx.train.runner import StepRunner


def ensure_workdir(workdir: str) -> str:
    """Create `workdir` if needed and check that it is writable."""
    if not workdir:
        raise ValueError("--workdir is required: a directory for checkpoints and metrics")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ValueError(f"--workdir {workdir!r} is not writable: {e.strerror}") from None
    return os.path.abspath(workdir)  # orbax needs absolute checkpoint paths


@dataclasses.dataclass
class Experiment:
    """Everything built once from a config: mesh, model, optimizer, shardings, steps."""

    config: object
    workdir: str

    def __post_init__(self):
        c = self.config
        self.model_cfg = TransformerConfig(**c.model)
        self.mesh = sh.make_mesh(sh.MeshShape(**c.mesh))
        self.rules = tuple(tuple(r) for r in c.sharding_rules)
        tc = c.train
        self.micro_batch_size = tc.micro_batch_size or tc.batch_size
        divisor = sh.batch_divisor(self.mesh, self.rules)
        if self.micro_batch_size % divisor or tc.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.micro_batch_size} must divide "
                f"train.batch_size={tc.batch_size} and be a multiple of the {divisor} "
                "batch shards of config.mesh"
            )
        single_step = c.batch.adaptive or self.micro_batch_size != tc.batch_size
        if c.data.packing in ("dd", "chunkflow") and single_step:
            raise ValueError(
                f"data.packing={c.data.packing!r} needs the whole batch in one step: "
                "train.micro_batch_size=0 and batch.adaptive=False"
            )
        longest_rows = (tc.batch_size * tc.seq_len) >> c.data.get("dd_max_log2", 0)
        if c.data.packing == "dd" and longest_rows % divisor:
            raise ValueError(
                f"data.dd_max_log2={c.data.dd_max_log2}: the longest bucket has {longest_rows} "
                f"rows per step, not a multiple of the {divisor} batch shards of config.mesh"
            )
        if c.data.packing == "chunkflow" and "lact" in self.model_cfg.block_pattern:
            raise ValueError(
                "data.packing='chunkflow' runs dependent chunks through attention layers: "
                "it needs no 'lact' in model.block_pattern"
            )
        self.adaptive = None
        if c.batch.adaptive:
            self.adaptive = optim.AdaptiveBatchConfig(
                micro_batch_size=self.micro_batch_size,
                **{k: v for k, v in c.batch.items() if k != "adaptive"},
            )
        self.schedule = make_schedule(
            ScheduleConfig(**c.schedule),
            total_steps=tc.steps,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
        )
        self.tx = make_optimizer(OptimizerConfig(**c.optimizer), self.schedule)
        self.graphdef, _ = steplib.abstract_model(self.model_cfg)
        self.shardings = steplib.state_shardings(self.model_cfg, self.tx, self.mesh, self.rules)
        self.batch_sharding = sh.batch_sharding(self.mesh, self.rules)
        self.corpus_summary = {}
        self.checkpointer = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            keep=c.train.keep_checkpoints,
            save_every=c.train.checkpoint_every,
            async_save=c.train.async_checkpoints,
        )

    def dataset(self, split: str):
        """The grain dataset of one split."""
        c = self.config
        corpus = data_input.load_split(c.data, split, self.workdir)
        self.corpus_summary[split] = (
            f"{split}: {corpus.num_documents} documents, {corpus.num_tokens} tokens, "
            f"{corpus.num_empty_skipped} empty files skipped"
        )
        return data_input.make_dataset(
            corpus,
            c.data,
            seq_len=c.train.seq_len,
            global_batch_size=self.micro_batch_size,
            seed=c.seed,
            train=split == "train",
        )

    def init_state(self):
        """A fresh TrainState."""
        c = self.config
        return steplib.init_state(
            self.model_cfg, self.tx, c.seed, self.shardings, c.train.batch_size
        )

    def restore_or_init(self, data_iterator=None):
        """The latest checkpoint's state (and iterator), else a fresh state."""
        step = self.checkpointer.latest_step()
        if step is None:
            return self.init_state()
        shapes = jax.eval_shape(self.init_state)
        abstract = abstract_like(shapes, self.shardings)
        return self.checkpointer.restore(step, abstract, data_iterator)

    def evaluator(self):
        """A function params -> mean eval loss over `train.eval_batches` fixed batches."""
        eval_ds = self.dataset("eval")
        eval_step = steplib.make_eval_step(
            self.graphdef, self.shardings.params, self.batch_sharding
        )
        num_batches = self.config.train.eval_batches

        def evaluate(params):
            total, count = 0.0, 0
            for batch in itertools.islice(iter(eval_ds), num_batches):
                loss_sum, n = eval_step(params, sh.put_batch(batch, self.batch_sharding))
                total, count = total + float(loss_sum), count + int(n)
            return total / max(count, 1)

        return evaluate


def _evaluator_or_none(exp):
    """The evaluator, or None (with a warning) when the eval split is empty."""
    try:
        return exp.evaluator()
    except data_input.EmptySplitError as e:
        print(f"lcx: warning: {e}; training without evaluation", file=sys.stderr)
        return None


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train to `config.train.steps`, resuming from WORKDIR/checkpoints if present.

    `stop_after` ends this invocation early (checkpointing first), as a preemption
    would: a later call resumes on the same schedule. Returns the last logged record.
    """
    workdir = ensure_workdir(workdir)
    exp = Experiment(config, workdir)
    tc = config.train
    data_iter = iter(exp.dataset("train"))
    state = exp.restore_or_init(data_iter)
    evaluate = _evaluator_or_none(exp) if tc.eval_every > 0 else None
    runner = StepRunner(exp, int(state.batch_size))
    start, tokens = int(state.step), int(state.rows_seen) * tc.seq_len
    progress = Progress(tc.steps, start, enabled=tc.progress)
    for line in exp.corpus_summary.values():
        progress.write(f"corpus {line}")
    window = MetricsWindow(MetricsWriter(workdir), progress, always=(start + 1, tc.steps))
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    for step in range(start + 1, end + 1):
        state, metrics, stats = runner(state, data_iter, step)
        window.add(step, metrics, stats, log=step % tc.log_every == 0)
        tokens += metrics["batch_size"] * tc.seq_len
        done = step == end or 0 < tc.max_tokens <= tokens
        exp.checkpointer.save(step, state, data_iter, force=done)
        if evaluate is not None and (step % tc.eval_every == 0 or step == tc.steps or done):
            window.flush()
            window.write_eval(step, evaluate(state.params))
        if done:
            break
    window.flush()
    progress.close()
    exp.checkpointer.close()
    return window.last


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Evaluate the latest checkpoint in WORKDIR on the eval split."""
    workdir = ensure_workdir(workdir)
    exp = Experiment(config, workdir)
    step = exp.checkpointer.latest_step()
    if step is None:
        raise ValueError(f"--workdir {workdir!r} has no checkpoint to evaluate; train first")
    state = exp.restore_or_init()
    record = {"step": step, "eval_loss": exp.evaluator()(state.params)}
    MetricsWriter(workdir).write(record)
    exp.checkpointer.close()
    return record
