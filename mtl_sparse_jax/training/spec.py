"""What a train step computes, as one hashable value: `StepSpec`, built from a config by `step_spec(config)`.

Every config field that the traced train or eval step reads is a field of `StepSpec` (or of the model or tasks
it holds), and the jitted steps take the spec as a static argument. jit's own cache therefore decides when to
recompile: an equal spec reuses the compiled step, a spec that differs in anything the step reads compiles a
new one. There is no hand-kept list of "structural" keys and no cache of trainers. lr and λ are not in the
spec: they live in the optimizer state (`optax.inject_hyperparams`), so a λ sweep reuses the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_sparse_jax import config_utils, models, sparsity
from mtl_sparse_jax import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The static part of the optimizer (lr and λ are injected hyperparameters, not part of it)."""

    name: str  # 'prox_adamw' | 'adam_l2'
    b1: float
    b2: float
    eps: float
    weight_decay: float
    prox: str  # sparsity.prox_adamw's prox kind
    group_rule: str  # regex over '/'-joined param paths of the grouped (sparsified) kernels


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything the train and eval steps depend on besides their array arguments. Hashable."""

    model: models.MultiTaskModel
    tasks: tuple[tasks_lib.Task, ...]
    optimizer: OptimizerSpec
    combiner: str
    fixed_weights: tuple[tuple[str, float], ...] | None
    penalty_in_loss: bool
    train_metrics: bool
    mesh: Mesh

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def task_map(self) -> dict[str, tasks_lib.Task]:
        return {t.name: t for t in self.tasks}

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def group_axes(self, params):
        """The channel-group axes of the params tree: axis 2 (HWIO input channel) of kernels matching the rule."""
        return sparsity.group_axes_by_regex(params, rules=((self.optimizer.group_rule, 2),), ndim=4)

    def optimizer_for(self, trainable) -> optax.GradientTransformation:
        """The optimizer over the trainable tree ({model params..., 'loss_weights': ...})."""
        return build_optimizer(self.optimizer, self.group_axes(trainable))


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), ("data",))


def build_tasks(config) -> dict[str, tasks_lib.Task]:
    """The config's tasks, each with the options it takes (dense tasks: loss resolution; seg: classes)."""
    out = {}
    for name in config.tasks:
        options = {}
        if name == "seg":
            options["num_classes"] = config.seg_num_classes
            options["num_logits"] = config.seg_num_logits or config.seg_num_classes
        if name in tasks_lib.DENSE_TASKS:
            options["loss_resolution"] = config.loss_resolution
        if name in tasks_lib.ATTRIBUTE_TASKS:
            options["double_sigmoid"] = config.double_sigmoid
        out[name] = tasks_lib.get_task(name, **options)
    return out


def build_model(config, tasks) -> models.MultiTaskModel:
    from mtl_sparse_jax import lomt

    heads = tuple(models.HeadSpec(name=t.name, kind=t.head, out_channels=t.out_channels) for t in tasks.values())
    m = config.model
    return models.MultiTaskModel(
        heads=heads,
        depth=m.depth,
        width_multiplier=m.width_multiplier,
        head_width_multiplier=m.head_width_multiplier,
        output_stride=m.output_stride,
        dtype=jnp.dtype(m.dtype),
        reference_bn_updates=bool(m.reference_bn_updates),
        taps=lomt.model_taps(config),
        tap_point=m.tap_point,
    )


def fixed_weights(config) -> tuple[tuple[str, float], ...] | None:
    """loss.fixed_weights ('seg=1,depth=2') as sorted (task, weight) pairs; None unless the combiner is 'fixed'."""
    if config.loss.combiner != "fixed":
        return None
    try:
        pairs = [kv.split("=") for kv in config.loss.fixed_weights.split(",") if kv]
        weights = {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise config_utils.ConfigError(
            f"loss.fixed_weights={config.loss.fixed_weights!r} is not 'task=weight,...'; e.g. 'seg=1,depth=2'"
        ) from None
    missing = [t for t in config.tasks if t not in weights]
    if missing:
        raise config_utils.ConfigError(f"loss.fixed_weights lacks tasks {missing}; give 'task=weight' for every task")
    return tuple(sorted(weights.items()))


def step_spec(config, *, devices=None, mesh: Mesh | None = None) -> StepSpec:
    """The StepSpec of a (validated) config on `mesh` (default: a 'data' mesh over `devices` or all devices)."""
    mesh = make_mesh(devices) if mesh is None else mesh
    num_devices = int(mesh.devices.size)
    if config.batch_size % num_devices != 0:
        raise config_utils.ConfigError(
            f"batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
            f"set --config.batch_size to a multiple of {num_devices}"
        )
    if config.optimizer.name not in ("prox_adamw", "adam_l2"):
        raise config_utils.ConfigError(
            f"unknown optimizer.name {config.optimizer.name!r}; use 'prox_adamw' or 'adam_l2'"
        )
    tasks = build_tasks(config)
    o = config.optimizer
    return StepSpec(
        model=build_model(config, tasks),
        tasks=tuple(tasks.values()),
        optimizer=OptimizerSpec(
            name=o.name,
            b1=float(o.b1),
            b2=float(o.b2),
            eps=float(o.eps),
            weight_decay=float(o.weight_decay),
            prox=config.sparsity.prox,
            group_rule=config.sparsity.group_rule,
        ),
        combiner=config.loss.combiner,
        fixed_weights=fixed_weights(config),
        penalty_in_loss=bool(config.sparsity.penalty_in_loss),
        train_metrics=bool(config.log.train_metrics),
        mesh=mesh,
    )


def build_optimizer(o: OptimizerSpec, group_axes) -> optax.GradientTransformation:
    """The optimizer with injected float32 `learning_rate` and `lam` (changeable without recompiling)."""
    if o.name == "prox_adamw":
        # Only lr and lam are injected; the betas stay Python floats, since 1 - b2 computed in float32 would be
        # off by ~1e-5 relative.
        make = functools.partial(
            sparsity.prox_adamw,
            group_axes=group_axes,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            prox=o.prox,
        )
        return optax.inject_hyperparams(
            make,
            static_args=("group_axes", "b1", "b2", "eps", "weight_decay", "prox", "max_iter", "tol"),
            hyperparam_dtype=jnp.float32,
        )(learning_rate=0.0, lam=0.0)
    if o.name == "adam_l2":
        # torch.optim.Adam(weight_decay=wd): L2 added to the gradient before the moments, eps 1e-8.
        def make_adam_l2(learning_rate, lam):
            del lam  # a dense optimizer; kept so that logging reads both hyperparameters the same way
            return optax.chain(
                optax.add_decayed_weights(o.weight_decay), optax.adam(learning_rate, o.b1, o.b2, eps=1e-8)
            )

        return optax.inject_hyperparams(make_adam_l2, hyperparam_dtype=jnp.float32)(learning_rate=0.0, lam=0.0)
    raise config_utils.ConfigError(f"unknown optimizer.name {o.name!r}; use 'prox_adamw' or 'adam_l2'")
