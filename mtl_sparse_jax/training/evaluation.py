"""Evaluation: metrics and losses over a whole split, and the test evaluation of a trained trial.

`evaluate(spec, variables, batches)` runs the jitted eval step over every batch, accumulating each task's
sufficient statistics on the device, and finalises them on the host: all examples count once, padding
(weight 0) counts never, so results do not depend on the batch size or the device count.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mtl_sparse_jax.training.spec import StepSpec
from mtl_sparse_jax.training.step import total_loss


def put_batch(spec: StepSpec, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places a process-local numpy batch on the mesh, sharded along the batch axis (already-placed arrays pass)."""
    return {
        k: v if isinstance(v, jax.Array) else jax.make_array_from_process_local_data(spec.batch_sharding, v)
        for k, v in batch.items()
    }


def prefetch(spec: StepSpec, batches: Iterable[dict], size: int = 2) -> Iterator[dict]:
    """Batches placed on the mesh, `size` ahead of the consumer (device transfers overlap compute)."""
    queue: deque = deque()
    for batch in batches:
        queue.append(put_batch(spec, batch))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _init_acc(spec: StepSpec):
    return {t.name: t.init_stats() for t in spec.tasks}


@functools.partial(jax.jit, static_argnums=(0,))
def _init_acc_on_mesh(spec: StepSpec):
    return jax.lax.with_sharding_constraint(_init_acc(spec), spec.replicated)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("train_mode",), donate_argnums=(3,))
def eval_step(spec: StepSpec, params, batch_stats, acc, batch, rng, *, train_mode: bool):
    """Adds one batch's statistics to `acc` (eval mode, or train mode with dropout as the reference's test)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train_mode:
        outputs, _ = spec.model.apply(
            variables, batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": rng}
        )
    else:
        outputs = spec.model.apply(variables, batch["image"], train=False)
    return {t.name: t.update_stats(acc[t.name], outputs[t.name], batch) for t in spec.tasks}


def evaluate(
    spec: StepSpec, variables: dict, batches: Iterable[dict], *, train_mode: bool = False, seed: int = 0
) -> dict[str, float]:
    """Metrics and losses over a whole split, in eval mode by default.

    `variables`: {'params', 'batch_stats', 'loss_weights'}; the total combines every task's loss with the
    loss weights (all tasks active).
    """
    acc = _init_acc_on_mesh(spec)
    rng = jax.random.PRNGKey(seed)
    for i, batch in enumerate(prefetch(spec, batches)):
        acc = eval_step(
            spec,
            variables["params"],
            variables["batch_stats"],
            acc,
            batch,
            jax.random.fold_in(rng, i),
            train_mode=train_mode,
        )
    # Every process takes process 0's values (bit for bit), so early stopping and best checkpoints, decided from
    # these metrics on each process, are the same decisions everywhere.
    acc = multihost_utils.broadcast_one_to_all(jax.device_get(acc))
    out: dict[str, float] = {}
    losses = {}
    for task in spec.tasks:
        values = task.finalize(acc[task.name])
        losses[task.name] = values.pop(f"{task.name}/loss")
        out[f"loss/{task.name}"] = losses[task.name]
        out.update({k: float(v) for k, v in values.items()})
    all_active = {t: jnp.ones((), jnp.float32) for t in spec.task_names}
    total = total_loss(spec, {k: jnp.float32(v) for k, v in losses.items()}, variables["loss_weights"], all_active)
    out["loss/total"] = float(total)
    return out
