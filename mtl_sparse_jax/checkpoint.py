"""Checkpoints of a trial with orbax: `latest` (full train state, for resuming) and the best ones for selection.

Layout under `trial_<k>/checkpoints/`:

    latest/<epoch>/        full train state + JSON meta (history, early stopping); the two newest kept
    best/<epoch>/          params and batch stats at the best validation total
    best_<task>/<epoch>/   params and batch stats at that task's best validation loss

Orbax writes each step to a temporary directory and renames it when complete, and its managers list only
finalised steps, so a checkpoint half-written by a killed run is never read back. Restoring takes an abstract
target (shapes, dtypes and shardings from `jax.eval_shape` on the current mesh), so a checkpoint written on
8 devices restores on 1.

A checkpoint that cannot be read (truncated or corrupted files) raises `CheckpointError`, one line naming its
directory. `restore_newest_readable` (used on resume) falls back to the previous `latest` step and says so.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names its directory and the fix."""


def _manager(directory: str, max_to_keep: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


class TrialCheckpoints:
    """The latest and best checkpoints of one trial."""

    def __init__(self, directory: str):
        self.directory = directory
        self._managers: dict[str, ocp.CheckpointManager] = {}

    def _get(self, name: str) -> ocp.CheckpointManager:
        if name not in self._managers:
            keep = 2 if name == "latest" else 1  # a spare for resuming when the newest is unreadable
            self._managers[name] = _manager(os.path.join(self.directory, name), max_to_keep=keep)
        return self._managers[name]

    def exists(self, name: str) -> bool:
        path = os.path.join(self.directory, name)
        return os.path.isdir(path) and self._get(name).latest_step() is not None

    def save(self, name: str, epoch: int, state: Any, meta: dict) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON) as step `epoch` of checkpoint `name`."""
        mngr = self._get(name)
        if epoch in mngr.all_steps():
            # A run killed after this save but before the next `latest` redoes the epoch; replace, don't fail.
            mngr.delete(epoch)
        mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()

    def latest_epoch(self, name: str) -> int | None:
        if not os.path.isdir(os.path.join(self.directory, name)):
            return None
        return self._get(name).latest_step()

    def restore(self, name: str, abstract_state: Any, *, step: int | None = None) -> tuple[Any, dict]:
        """Restores step `step` (default: the newest) of `name` into the shapes and shardings of `abstract_state`."""
        mngr = self._get(name)
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"no finished checkpoint in {os.path.join(self.directory, name)}; train first with --mode train"
            )
        where = os.path.join(self.directory, name, str(step))
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds; all mean "unreadable")
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint {where} cannot be read ({type(e).__name__}: {first}); it is truncated, corrupted or was "
                f"written for another model. Delete it to fall back to an older one, or use a new --workdir"
            ) from None
        if restored["meta"] is None:
            raise CheckpointError(f"checkpoint {where} has no meta data; delete it or use a new --workdir")
        return restored["state"], restored["meta"]

    def restore_newest_readable(self, name: str, abstract_state: Any) -> tuple[Any, dict]:
        """Like `restore`, but an unreadable newest step falls back to the previous one, with a message."""
        steps = sorted(self._get(name).all_steps(), reverse=True)
        if not steps:
            return self.restore(name, abstract_state)
        for i, step in enumerate(steps):
            try:
                return self.restore(name, abstract_state, step=step)
            except CheckpointError as e:
                if i + 1 == len(steps):
                    raise
                print(f"warning: {e}; resuming from the previous checkpoint (epoch {steps[i + 1]})", flush=True)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for mngr in self._managers.values():
            mngr.close()
        self._managers.clear()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` (arrays or ShapeDtypeStructs), all placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
