"""The train step: a pure, differentiable update, and the jitted wrapper that donates and accumulates.

`update(spec, state, batch, rng) -> (new_state, losses)` is a pure function: no donation, no metric
accumulation, no host callbacks, so it can be differentiated through (meta-sparsity) or vmapped.
`train_step(spec, state, batch, rng, train_stats)` is the jitted wrapper the loop calls: it donates the old
state and adds the step's losses (and, with `log.train_metrics`, the task metrics of the train-mode outputs) to
running sums. The spec is a static argument, so jit's cache decides recompilation (see `training.spec`).

The step runs under jit over the spec's 1-D mesh: the batch is sharded over axis 'data', the state is
replicated, so BatchNorm sees the global batch and `batch_size` is the global batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mtl_sparse_jax import losses as losses_lib
from mtl_sparse_jax import models, sparsity
from mtl_sparse_jax.training.spec import StepSpec
from mtl_sparse_jax.training.state import TrainState, split_trainable, trainable


def task_losses(spec: StepSpec, outputs, batch) -> dict:
    """Each task's batch loss (numerator / denominator of its loss terms)."""
    out = {}
    for task in spec.tasks:
        num, den = task.loss_terms(outputs[task.name], batch)
        out[task.name] = num / jnp.maximum(den, 1e-12)
    return out


def total_loss(spec: StepSpec, losses, loss_weights, active):
    """The combined loss of the active tasks, as the config's combiner defines it."""
    fixed = dict(spec.fixed_weights) if spec.fixed_weights is not None else None
    return losses_lib.combine_losses(spec.combiner, losses, loss_weights, active=active, fixed_weights=fixed)


def _update_with_outputs(spec: StepSpec, state: TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    tree = trainable(state.params, state.loss_weights)
    group_axes = spec.group_axes(tree)

    def loss_fn(tree):
        params, loss_weights = split_trainable(tree)
        outputs, new_vars = spec.model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        losses = task_losses(spec, outputs, batch)
        total = total_loss(spec, losses, loss_weights, state.task_active)
        if spec.penalty_in_loss:
            lam = state.opt_state.hyperparams["lam"]
            total = total + sparsity.group_lasso_penalty(tree, group_axes, lam, weighting="num_groups")
        return total, (losses, new_vars["batch_stats"], outputs)

    (total, (losses, new_batch_stats, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree)
    updates, new_opt_state = spec.optimizer_for(tree).update(grads, state.opt_state, tree)
    # A stopped task's head is frozen: no gradient step, no weight decay.
    heads = {models.head_param_name(t): t for t in spec.task_names}
    updates = {
        k: (jax.tree.map(lambda u, t=heads[k]: u * state.task_active[t], v) if k in heads else v)
        for k, v in updates.items()
    }
    new_params, new_loss_weights = split_trainable(optax.apply_updates(tree, updates))
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        batch_stats=new_batch_stats,
        loss_weights=new_loss_weights,
        opt_state=new_opt_state,
    )
    return new_state, {"total": total, **losses}, outputs


def update(spec: StepSpec, state: TrainState, batch, rng) -> tuple[TrainState, dict]:
    """One optimizer step on `batch`: (new state, {'total': combined loss, task: task loss}). Pure."""
    new_state, losses, _ = _update_with_outputs(spec, state, batch, rng)
    return new_state, losses


def init_train_stats(spec: StepSpec) -> dict:
    """Zero running sums for one epoch: per-task metric statistics (if logged) and loss sums."""
    stats = {t.name: t.init_stats() for t in spec.tasks} if spec.train_metrics else {}
    stats["_loss"] = {k: jnp.zeros((), jnp.float32) for k in ("total", "count", *spec.task_names)}
    return stats


@functools.partial(jax.jit, static_argnums=(0,))
def init_train_stats_on_mesh(spec: StepSpec) -> dict:
    return jax.lax.with_sharding_constraint(init_train_stats(spec), spec.replicated)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def train_step(spec: StepSpec, state: TrainState, batch, rng, train_stats):
    """The jitted step: (new state, step losses, train stats + this step's), the old state donated."""
    new_state, step_losses, outputs = _update_with_outputs(spec, state, batch, rng)
    if spec.train_metrics:
        train_stats = dict(train_stats)
        for task in spec.tasks:
            train_stats[task.name] = task.update_stats(
                train_stats[task.name], jax.lax.stop_gradient(outputs[task.name]), batch
            )
    loss_acc = dict(train_stats["_loss"])
    loss_acc["total"] = loss_acc["total"] + step_losses["total"]
    loss_acc["count"] = loss_acc["count"] + 1.0
    for name in spec.task_names:
        loss_acc[name] = loss_acc[name] + step_losses[name]
    train_stats = {**train_stats, "_loss": loss_acc}
    return jax.lax.with_sharding_constraint((new_state, step_losses, train_stats), spec.replicated)
