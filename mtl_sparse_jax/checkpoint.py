"""Checkpoints of a trial with orbax: `latest` (full train state, for resuming) and the best ones for selection.

Layout under `trial_<k>/checkpoints/`:

    latest/<epoch>/        full train state + JSON meta (history, early stopping); one kept
    best/<epoch>/          params and batch stats at the best validation total
    best_<task>/<epoch>/   params and batch stats at that task's best validation loss

Orbax writes each step to a temporary directory and renames it when complete, and its managers list only
finalised steps, so a checkpoint half-written by a killed run is never read back. Restoring takes an abstract
target (shapes, dtypes and shardings from `jax.eval_shape` on the current mesh), so a checkpoint written on
8 devices restores on 1.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
            self._managers[name] = _manager(os.path.join(self.directory, name))
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

    def restore(self, name: str, abstract_state: Any) -> tuple[Any, dict]:
        """Restores the newest step of `name` into the shapes and shardings of `abstract_state`."""
        mngr = self._get(name)
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no finished checkpoint in {os.path.join(self.directory, name)}; train first with --mode train"
            )
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def close(self) -> None:
        for mngr in self._managers.values():
            mngr.close()
        self._managers.clear()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` (arrays or ShapeDtypeStructs), all placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
