"""The train state, created directly on the mesh, and its abstract twin for checkpoint restores.

`TrainState` holds the model's params and batch stats, the loss combiner's trainable weights (learned
uncertainty log-variances) as a field of their own, the optimizer state and the per-task active flags. The
optimizer runs over one trainable tree, `{**params, 'loss_weights': loss_weights}` (`trainable`), so Adam
moments, weight decay and step count treat the loss weights like any other leaf; the prox only touches the
grouped backbone kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from mtl_sparse_jax import losses as losses_lib
from mtl_sparse_jax.training.spec import StepSpec

LOSS_WEIGHTS_KEY = "loss_weights"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'backbone': ..., 'head_<task>': ...}
    batch_stats: Any
    loss_weights: Any  # {task: log sigma^2} for the learned uncertainty combiner, else {}
    opt_state: Any
    task_active: dict  # task -> 0./1. float32; a stopped task leaves the loss and its head freezes


def trainable(params, loss_weights) -> dict:
    """The tree the optimizer updates: the model params plus the loss weights under 'loss_weights'."""
    return {**params, LOSS_WEIGHTS_KEY: loss_weights}


def split_trainable(tree) -> tuple[dict, Any]:
    """Inverse of `trainable`: (model params, loss weights)."""
    params = {k: v for k, v in tree.items() if k != LOSS_WEIGHTS_KEY}
    return params, tree[LOSS_WEIGHTS_KEY]


def _init(spec: StepSpec, image_size: tuple[int, int], rng) -> TrainState:
    image = jnp.zeros((1, *image_size, 3), jnp.float32)
    variables = spec.model.init({"params": rng, "dropout": rng}, image, train=False)
    params = dict(variables["params"])
    loss_weights = losses_lib.init_loss_weights(spec.combiner, spec.task_names)
    opt_state = spec.optimizer_for(trainable(params, loss_weights)).init(trainable(params, loss_weights))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        loss_weights=loss_weights,
        opt_state=opt_state,
        task_active={t: jnp.ones((), jnp.float32) for t in spec.task_names},
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_on_mesh(spec: StepSpec, image_size: tuple[int, int], rng) -> TrainState:
    return jax.lax.with_sharding_constraint(_init(spec, image_size, rng), spec.replicated)


def create_train_state(spec: StepSpec, image_size, seed: int, *, learning_rate: float, lam: float) -> TrainState:
    """A fresh train state, replicated on the spec's mesh, with the given lr and λ.

    Parameters are drawn with the 'rbg' generator: on the CPU, XLA compiles threefry-based init of a deep
    network an order of magnitude slower, and init runs replicated, so the result is the same on any mesh.
    """
    state = _init_on_mesh(spec, tuple(image_size), jax.random.key(seed, impl="rbg"))
    return set_hyperparams(spec, state, learning_rate=learning_rate, lam=lam)


def abstract_train_state(spec: StepSpec, image_size) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state: the target for restoring a checkpoint."""
    shapes = jax.eval_shape(functools.partial(_init, spec, tuple(image_size)), jax.random.key(0, impl="rbg"))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec.replicated), shapes)


def eval_variables(state) -> dict:
    """What the best checkpoints keep and evaluation needs: params, batch stats and loss weights."""
    return {"params": state.params, "batch_stats": state.batch_stats, "loss_weights": state.loss_weights}


def set_hyperparams(spec: StepSpec, state: TrainState, **values) -> TrainState:
    """The state with injected optimizer hyperparameters (learning_rate, lam) replaced, on the mesh."""
    hp = dict(state.opt_state.hyperparams)
    for k, v in values.items():
        hp[k] = jax.device_put(jnp.asarray(v, hp[k].dtype), spec.replicated)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))


@functools.partial(jax.jit, static_argnums=(0,))
def _fresh_opt_state(spec: StepSpec, params, loss_weights):
    tree = trainable(params, loss_weights)
    return jax.lax.with_sharding_constraint(spec.optimizer_for(tree).init(tree), spec.replicated)


def reset_optimizer(spec: StepSpec, state: TrainState) -> TrainState:
    """Fresh moments and step count (the reference's per-epoch optimizer rebuild); same lr and λ."""
    hp = state.opt_state.hyperparams
    opt_state = _fresh_opt_state(spec, state.params, state.loss_weights)
    return state.replace(opt_state=opt_state._replace(hyperparams=hp))


def hyperparams(state: TrainState) -> dict[str, float]:
    hp = jax.device_get(state.opt_state.hyperparams)
    return {k: float(v) for k, v in hp.items()}
