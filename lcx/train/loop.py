"""The training and evaluation loops: `train_and_evaluate(config, workdir)`.

Metrics are read one step late so the host never waits on the step it just
dispatched; tokens/s counts real (non-padding) target tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lcx import optim, plots
from lcx.attention.ring import sequence_layout
from lcx.errors import UserError
from lcx.model import TransformerConfig
from lcx.packing import strategy as packing_strategy
from lcx.runtime import sharding as sh
from lcx.settings import Settings, as_dict, resolve
from lcx.train import input as data_input
from lcx.train import model_source, run_record
from lcx.train import step as steplib
from lcx.train.checkpoint import Checkpointer, abstract_like
from lcx.train.metrics import MetricsWindow, MetricsWriter, Progress, read_metrics
from lcx.train.optimizer import OptimizerConfig, ScheduleConfig, make_optimizer, make_schedule
from lcx.train.preemption import Interrupted, StopSignals
from lcx.train.runner import StepRunner

LOSS_CURVE = "loss.png"  # written into the workdir at the end of every training run


def ensure_workdir(workdir: str, *, writable: bool = True) -> str:
    """Create `workdir` if needed and check that it is writable (or, for reading, exists)."""
    if not workdir:
        raise UserError("--workdir is required: a directory for checkpoints and metrics")
    if not writable:
        if not os.path.isdir(workdir):
            raise UserError(f"--workdir {workdir!r} does not exist")
        return os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise UserError(f"--workdir {workdir!r} is not writable: {e.strerror}") from None
    return os.path.abspath(workdir)  # orbax needs absolute checkpoint paths


@dataclasses.dataclass
class Experiment:
    """Everything built once from a config: mesh, model, optimizer, shardings, steps.

    With `read_only`, checkpoints are only read and nothing is written to the workdir
    (evaluating a colleague's finished run).
    """

    config: Settings  # or a config to resolve
    workdir: str
    read_only: bool = False

    def __post_init__(self):
        c = self.config = resolve(self.config)
        self.workdir = os.path.abspath(self.workdir)  # orbax needs absolute checkpoint paths
        self.packing = packing_strategy(c.data.packing)  # before any data work
        packing_settings = c.data.packing_settings()
        self.tokenizer = model_source.tokenizer_of(c)
        self.model_cfg: TransformerConfig = model_source.model_config(c, self.tokenizer)
        self.mesh = sh.make_mesh(c.mesh)
        self.rules = c.sharding_rules
        tc = c.train
        self.checkpointer = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            keep=c.train.keep_checkpoints,
            save_every=c.train.checkpoint_every,
            async_save=c.train.async_checkpoints,
            read_only=self.read_only,
        )
        self.resume_step = self.checkpointer.latest_step()
        if self.read_only:
            self.plan = run_record.RunPlan(tc.batch_size, tc.micro_batch_size or tc.batch_size)
        else:
            try:
                self.plan = run_record.plan_run(
                    c, self.workdir, resuming=self.resume_step is not None
                )
            except ValueError:
                self.checkpointer.close()  # else orbax's event loop complains at exit
                raise
        self.micro_batch_size = self.plan.micro_batch_size
        divisor = sh.batch_divisor(self.mesh, self.rules)
        if self.micro_batch_size % divisor or tc.batch_size % self.micro_batch_size:
            raise UserError(
                f"train.micro_batch_size={self.micro_batch_size} must divide "
                f"train.batch_size={tc.batch_size} and be a multiple of the {divisor} "
                "batch shards of config.mesh"
            )
        single_step = c.batch.adaptive or self.micro_batch_size != tc.batch_size
        if self.packing.whole_batches and single_step:
            raise UserError(
                f"data.packing={c.data.packing!r} needs the whole batch in one step: "
                "train.micro_batch_size=0 and batch.adaptive=False"
            )
        if self.packing.check_training is not None:
            self.packing.check_training(
                packing_settings,
                batch_size=tc.batch_size,
                seq_len=tc.seq_len,
                batch_shards=divisor,
            )
        self.sequence_shards = self.mesh.shape["sequence"]
        if self.sequence_shards > 1:
            check_sequence_parallel(c, self.model_cfg, self.sequence_shards)
        if self.packing.dependent_rows and self.model_cfg.mixers_without("dependent_rows"):
            raise UserError(
                f"data.packing={c.data.packing!r} runs dependent chunks through attention "
                f"layers: it needs none of {self.model_cfg.mixers_without('dependent_rows')} "
                "in model.block_pattern"
            )
        self.adaptive = None
        if c.batch.adaptive:
            self.adaptive = optim.AdaptiveBatchConfig(
                micro_batch_size=self.micro_batch_size,
                **{k: v for k, v in as_dict(c.batch).items() if k != "adaptive"},
            )
        self.schedule = make_schedule(
            ScheduleConfig.of(c.schedule),
            total_steps=tc.steps,
            batch_size=self.plan.first_batch_size,  # step lengths of the run's first batch
            seq_len=tc.seq_len,
        )
        self.tx = make_optimizer(OptimizerConfig.of(c.optimizer), self.schedule)
        self.graphdef, _ = steplib.abstract_model(self.model_cfg)
        self.shardings = steplib.state_shardings(self.model_cfg, self.tx, self.mesh, self.rules)
        self._frozen = None  # model.lora's base, loaded by frozen_params()
        self.batch_sharding = sh.batch_sharding(self.mesh, self.rules)
        self.corpus_summary = {}
        self.warnings = []
        if c.schedule.warmup_steps >= tc.steps and c.schedule.name != "power":
            self.warnings.append(
                f"schedule.warmup_steps={c.schedule.warmup_steps} >= train.steps={tc.steps}: "
                "the run ends before the learning rate reaches its peak"
            )

    def device_batch(self, batch):
        """A host batch on the mesh; in `sequence_layout` when rows are split over devices."""
        if self.sequence_shards > 1:
            batch = sequence_layout(batch, self.sequence_shards, self.config.ring.layout)
        return sh.put_batch(batch, self.batch_sharding)

    def mesh_context(self):
        """The mesh as ambient mesh when rows are split (attention then runs as a ring)."""
        return jax.set_mesh(self.mesh) if self.sequence_shards > 1 else contextlib.nullcontext()

    def dataset(self, split: str):
        """The grain dataset of one split."""
        c = self.config
        workdir = None if self.read_only else self.workdir
        corpus, self.corpus_summary[split] = data_input.load_corpus(
            c.data, split, workdir, self.tokenizer, c.train.seq_len
        )
        return data_input.make_dataset(
            corpus,
            c.data,
            seq_len=c.train.seq_len,
            global_batch_size=self.micro_batch_size,
            seed=c.seed,
            train=split == "train",
            pad_id=self.tokenizer.pad_id,
        )

    def frozen_params(self):
        """model.lora's frozen base, loaded once: `init.hf_checkpoint`'s weights, else the
        random init of `seed` (a resume reloads it the same way; checkpoints hold only
        the adapters). None without LoRA."""
        if self.model_cfg.lora is None or self._frozen is not None:
            return self._frozen
        shardings = steplib.frozen_shardings(self.model_cfg, self.mesh, self.rules)
        directory = model_source.hf_checkpoint(self.config)
        if directory:
            from lcx.checkpoints import load_params

            self._frozen = load_params(directory, self.model_cfg, shardings)
        else:
            self._frozen = steplib.init_frozen(self.model_cfg, self.config.seed, shardings)
        return self._frozen

    def init_state(self):
        """A fresh TrainState: `init.hf_checkpoint`'s weights, else a random init (with
        model.lora: the adapters' init; the base is `frozen_params`)."""
        c = self.config
        directory = model_source.hf_checkpoint(c)
        if directory and self.model_cfg.lora is None:
            from lcx.checkpoints import load_params

            params = load_params(directory, self.model_cfg, self.shardings.params)
            return steplib.state_from_params(params, self.tx, self.shardings, c.train.batch_size)
        return steplib.init_state(
            self.model_cfg, self.tx, c.seed, self.shardings, c.train.batch_size
        )

    def restore_or_init(self, data_iterator=None):
        """The latest complete checkpoint's state (and iterator), else a fresh state.

        A checkpoint that is incomplete (a write cut off) or unreadable while an earlier
        one restores is set aside as `<step>.incomplete`, with a warning; when none
        restores, the first error says the checkpoints do not fit this config.
        """
        if self.resume_step is None:
            return self.init_state()
        shapes = jax.eval_shape(self.init_state)
        abstract = abstract_like(shapes, self.shardings)
        failed = []
        for step in self.checkpointer.all_steps():
            try:
                if not self.checkpointer.is_complete(step):
                    raise ValueError("a file of the write is missing")
                state = self._restore(step, abstract, data_iterator)
            except (ValueError, KeyError, TypeError, OSError) as e:  # orbax, grain, tensorstore
                failed.append((step, e))
                continue
            for bad, e in failed:
                self.checkpointer.set_aside(bad)
                self.warnings.append(
                    f"warning: the checkpoint of step {bad} is incomplete or unreadable "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); moved to "
                    f"checkpoints/{bad}.incomplete, resuming from step {step}"
                )
            self.resume_step = step
            return state
        step, e = failed[0]
        raise UserError(
            f"--workdir {self.workdir}: the checkpoint of step {step} does not fit this "
            f"config's model, optimizer or data pipeline ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); use a new --workdir"
        ) from None

    def _restore(self, step, abstract, data_iterator):
        """One step's checkpoint; one written before rows were counted in two words
        (a scalar `rows_seen`) is read as such and converted."""
        try:
            return self.checkpointer.restore(step, abstract, data_iterator)
        except (ValueError, KeyError, TypeError):
            sharding = abstract.rows_seen.sharding
            scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
            try:
                old = self.checkpointer.restore(
                    step, abstract._replace(rows_seen=scalar), data_iterator
                )
            except (ValueError, KeyError, TypeError):
                pass
            else:
                rows = jax.device_put(steplib.wide_rows(int(old.rows_seen)), sharding)
                return old._replace(rows_seen=rows)
            raise

    def evaluator(self):
        """A function params -> mean eval loss over `train.eval_batches` fixed batches."""
        eval_ds = self.dataset("eval")
        eval_step = steplib.make_eval_step(
            self.graphdef, self.shardings.params, self.batch_sharding, self.frozen_params()
        )
        num_batches = self.config.train.eval_batches

        def evaluate(params):
            total, count = 0.0, 0
            for batch in itertools.islice(iter(eval_ds), num_batches):
                with self.mesh_context():
                    loss_sum, n = eval_step(params, self.device_batch(batch))
                total, count = total + float(loss_sum), count + float(n)
            return total / max(count, 1)

        return evaluate


def check_sequence_parallel(c, model_cfg, shards: int):
    """One-line ValueError for a config whose rows cannot be split over `shards` devices."""
    from lcx.attention.ring import LAYOUTS

    if c.ring.layout not in LAYOUTS:
        raise UserError(f"ring.layout={c.ring.layout!r}; valid: {LAYOUTS}")
    if c.train.seq_len % (2 * shards):
        raise UserError(
            f"train.seq_len={c.train.seq_len} must be a multiple of 2 * mesh.sequence = "
            f"{2 * shards} to split rows over the sequence axis"
        )
    no_ring = model_cfg.mixers_without("ring")
    if no_ring or packing_strategy(c.data.packing).whole_batches:
        raise UserError(
            f"mesh.sequence={shards} splits rows for ring attention: it needs mixers that "
            f"support it (model.block_pattern={model_cfg.block_pattern}; not {no_ring}) and "
            f"rows of train.seq_len (not data.packing={c.data.packing!r})"
        )


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
    would: a later call resumes on the same schedule. SIGINT / SIGTERM stop after the
    step in flight with a checkpoint and raise `Interrupted`. Returns the last logged
    record.
    """
    workdir = ensure_workdir(workdir)
    exp = Experiment(config, workdir)
    try:
        with StopSignals() as signals:  # a signal during set-up stops after the first step
            return _train(exp, stop_after, signals)
    finally:
        exp.checkpointer.close()


def _train(exp, stop_after, signals):
    """The body of train_and_evaluate."""
    config, workdir = exp.config, exp.workdir
    tc = config.train
    if exp.resume_step is None:
        run_record.write_record(config, workdir)
    data_iter = iter(exp.dataset("train"))
    state = exp.restore_or_init(data_iter)
    evaluate = _evaluator_or_none(exp) if tc.eval_every > 0 else None
    state, batch_size = _batch_size_to_run(exp, state)
    runner = StepRunner(exp, batch_size)
    start, tokens = int(state.step), steplib.host_rows(state.rows_seen) * tc.seq_len
    progress = Progress(tc.steps, start, enabled=tc.progress)
    for line in [*exp.corpus_summary.values(), *exp.warnings]:
        progress.write(f"lcx: {line}")
    writer = MetricsWriter(workdir)
    if exp.resume_step is not None:
        writer.truncate_after(start)
        changed = f"; changed: {', '.join(exp.plan.changed)}" if exp.plan.changed else ""
        progress.write(f"lcx: resumed from step {start} in {workdir}{changed}")
    if start >= tc.steps:
        progress.close()
        return _finished_record(workdir, start)
    window = MetricsWindow(writer, progress, always=(start + 1, tc.steps))
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    progress.write(f"lcx: compiling the train step, then training steps {start + 1}-{end}")
    stop = False
    for step in range(start + 1, end + 1):
        with exp.mesh_context():
            state, metrics, stats = runner(state, data_iter, step)
        window.add(step, metrics, stats, log=step % tc.log_every == 0)
        tokens += metrics["batch_size"] * tc.seq_len
        stop = signals.requested(step)
        done = step == end or 0 < tc.max_tokens <= tokens or stop
        exp.checkpointer.save(step, state, data_iter, force=done)
        if (
            evaluate is not None
            and not stop
            and (step % tc.eval_every == 0 or step == tc.steps or done)
        ):
            window.flush()
            window.write_eval(step, evaluate(state.params))
        if done:
            break
    window.flush()
    progress.close()
    exp.checkpointer.close()  # waits for the last save
    write_loss_curve(workdir)
    if stop:
        raise Interrupted(signals.signum, step)
    return window.last


def write_loss_curve(workdir: str) -> str | None:
    """WORKDIR/loss.png from its metrics.jsonl (process 0; the whole run, resumes too)."""
    if jax.process_index() != 0:
        return None
    ax = plots.loss_curve(read_metrics(workdir), title=f"Loss of {os.path.basename(workdir)}")
    return plots.save(ax, os.path.join(workdir, LOSS_CURVE))


def _batch_size_to_run(exp, state):
    """(state, sequences per step): the config's batch size unless AdAdaGrad controls it."""
    if exp.adaptive is not None:
        return state, int(state.batch_size)
    batch_size = exp.config.train.batch_size
    if int(state.batch_size) != batch_size:
        resized = jax.device_put(np.int32(batch_size), state.batch_size.sharding)
        state = state._replace(batch_size=resized)
    return state, batch_size


def _finished_record(workdir: str, step: int) -> dict:
    """The last records of a run that already reached train.steps."""
    try:
        records = read_metrics(workdir)
    except FileNotFoundError:
        records = []
    last = {}
    for record in records:
        last |= record
    return last | {"step": step, "already_finished": True}


def _writable(path: str) -> bool:
    """Whether this process may write in `path`."""
    return os.access(path, os.W_OK)


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Evaluate the latest checkpoint in WORKDIR on the eval split.

    A read-only workdir (someone else's finished run) is read, not written: the record
    is returned but not appended to its metrics.jsonl, and the corpus is not cached.
    """
    read_only = os.path.isdir(workdir) and not _writable(workdir)
    workdir = ensure_workdir(workdir, writable=not read_only)
    exp = Experiment(config, workdir, read_only=read_only)
    try:
        run_record.check_model(exp.config, workdir)
        step = exp.resume_step
        if step is None:
            raise UserError(f"--workdir {workdir!r} has no checkpoint to evaluate; train first")
        state = exp.restore_or_init()
        record = {"step": step, "eval_loss": exp.evaluator()(state.params)}
    finally:
        exp.checkpointer.close()
    if not read_only:
        MetricsWriter(workdir).write(record)
    return record
