"""Orbax checkpoints of the train state together with the grain iterator state.

Saves are asynchronous for the arrays; the iterator state is a small JSON file per
process written by grain's own orbax handler. Orbax writes each step to a temporary
directory and renames it on completion, so `latest_step` only ever sees finished
checkpoints and an interrupted save never corrupts an earlier one.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from lcx.errors import UserError


class Checkpointer:
    """A CheckpointManager holding items `state` (TrainState) and `data` (iterator)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int,
        save_every: int,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep <= 0 or save_every <= 0:
            raise UserError(
                f"train.keep_checkpoints={keep} and train.checkpoint_every={save_every} "
                "must be positive"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps with a checkpoint directory, latest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def is_complete(self, step: int) -> bool:
        """Whether the step's items, the state's metadata and its array stores are there.

        Checked before orbax reads: a restore that fails on a missing file leaves orbax's
        other reads running ("Event loop is closed"). A store cut off mid-file still
        fails the restore, and the caller falls back.
        """
        root = os.path.join(self.directory, str(step))
        needed = [os.path.join("state", "_METADATA"), "data"]
        state = os.path.join(root, "state")
        if os.path.exists(os.path.join(state, "manifest.ocdbt")):  # OCDBT: the merged store
            needed.append(os.path.join("state", "d"))  # and the writers' stores below
            if not any(name.startswith("ocdbt.process_") for name in os.listdir(state)):
                return False
        return all(os.path.exists(os.path.join(root, name)) for name in needed)

    def set_aside(self, step: int):
        """Rename a broken step's directory to `<step>.incomplete` (process 0)."""
        if jax.process_index() == 0:
            root = os.path.join(self.directory, str(step))
            os.replace(root, root + ".incomplete")
        self.manager.reload()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether it saved."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restore the state into `abstract_state`'s shardings; the iterator in place."""
        self._check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, step: int, abstract_params):
        """Only the parameters of a checkpoint's state: no optimizer state, no iterator."""
        item = {"params": abstract_params}
        self._check_shapes(step, item)
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def _check_shapes(self, step: int, abstract):
        """ValueError where the checkpoint holds an array of another shape than `abstract`.

        Checked before orbax reads: its restore abandons the other arrays' reads half-way
        on the first mismatch ("coroutine ... was never awaited", "Event loop is closed").
        """
        handler = ocp.PyTreeCheckpointHandler()  # not a Checkpointer: no step metadata
        try:
            metadata = handler.metadata(epath.Path(self.directory) / str(step) / "state")
        finally:
            handler.close()
        saved = _shapes_by_path(getattr(metadata, "tree", metadata))
        for key, shape in _shapes_by_path(abstract).items():
            if key in saved and saved[key] != shape:
                raise ValueError(
                    f"checkpoint of step {step}: {'/'.join(key)} has shape {saved[key]}, "
                    f"this config's {shape}"
                )

    def close(self):
        """Wait for pending saves and release orbax's resources (idempotent)."""
        if self.manager is None:
            return
        self.manager.wait_until_finished()
        self.manager.close()
        self.manager = None


def abstract_like(shapes, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _shapes_by_path(tree) -> dict:
    """{(key, ...): shape} of a tree's array leaves, keys as strings whatever the containers."""

    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(map(name, k)): tuple(x.shape) for k, x in leaves if hasattr(x, "shape")}
