"""The task registry: one entry per task gives its head, activation, loss, metrics and target spec.

``get_task(name, **options) -> Task``. Known names: 'seg', 'depth', 'normals', 'edge' (NYU-v2), 'male',
'smile', 'eyebrows', 'glasses' (CelebAMask-HQ attributes; CelebA's 3-class face segmentation is 'seg' with
``num_classes=3``). Adding a task is one entry in ``TASK_BUILDERS``.

A `Task` works on the model's raw outputs (dense: ``[B,h,w,C]`` pre-activation at feature resolution;
classification: a logit ``[B]``) and a batch following docs/architecture.md:

* ``task.activation(raw)``: raw output -> prediction (softmax probabilities, sigmoid depth, unit normals...);
* ``task.loss_terms(raw, batch) -> (numerator, denominator)``: loss = numerator / denominator
  (`losses.loss_from_terms`); padded examples contribute to neither;
* ``task.init_stats()``, ``task.update_stats(stats, raw, batch)`` (jittable), ``task.finalize(stats)``
  (host): split-level metrics ``{'<task>/<metric>': float}``, including ``'<task>/loss'``, the split-level loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from mtl_sparse_jax import losses, metrics

__all__ = [
    "ATTRIBUTE_TASKS",
    "DENSE_TASKS",
    "PAPER_TABLE_COLUMNS",
    "TASK_BUILDERS",
    "Task",
    "get_task",
    "higher_is_better",
    "main_metric",
    "paper_table_columns",
    "task_names",
]

DENSE_TASKS = ("seg", "depth", "normals", "edge")
ATTRIBUTE_TASKS = ("male", "smile", "eyebrows", "glasses")

# Columns of the paper's result tables: Table 1/3 (NYU-v2) and Table 2 (CelebAMask-HQ).
PAPER_TABLE_COLUMNS = {
    "nyu": ("seg/iou_paper", "normals/cos_paper", "depth/mae_paper"),
    "celeba": ("seg/iou_paper", "male/acc_paper", "smile/acc_paper"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task: what its head outputs, how raw outputs become predictions, its loss and its metrics.

    Two tasks are equal when their name, options and declared outputs are (the functions are built from these
    by the registry), so an equal task built again does not retrace a jitted step that takes it as static.
    """

    name: str
    head: str  # 'deeplab' | 'classification'
    out_channels: int
    target_keys: tuple[str, ...]
    metric_directions: tuple[tuple[str, bool], ...]  # ('<task>/<metric>', higher is better)
    main_metric: str
    paper_metrics: tuple[str, ...]
    standard_metrics: tuple[str, ...]
    activation: Callable[[Any], Any]
    loss_fn: Callable[[Any, Mapping], tuple[Any, Any]]
    stats_init_fn: Callable[[], Any]
    stats_update_fn: Callable[[Any, Any, Mapping], Any]
    stats_finalize_fn: Callable[[Any], dict]
    options: tuple[tuple[str, Any], ...] = ()

    def _identity(self):
        return (self.name, self.head, self.out_channels, self.target_keys, self.metric_directions, self.options)

    def __eq__(self, other):
        return isinstance(other, Task) and self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return dict(self.metric_directions)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(metric for metric, _ in self.metric_directions)

    @property
    def is_dense(self) -> bool:
        return self.head == "deeplab"

    def loss_terms(self, raw, batch):
        """(numerator, denominator) of this task's loss on one batch; jittable."""
        return self.loss_fn(raw, batch)

    def loss(self, raw, batch):
        """The batch loss numerator / denominator."""
        return losses.loss_from_terms(*self.loss_fn(raw, batch))

    def init_stats(self):
        """Zero sufficient statistics, including the loss's numerator and denominator."""
        return {
            "loss_num": jnp.zeros((), jnp.float32),
            "loss_den": jnp.zeros((), jnp.float32),
            "metric": self.stats_init_fn(),
        }

    def update_stats(self, stats, raw, batch):
        """Stats plus this batch's; jittable. Padded examples (weight 0) add nothing."""
        numerator, denominator = self.loss_fn(raw, batch)
        return {
            "loss_num": stats["loss_num"] + numerator,
            "loss_den": stats["loss_den"] + denominator,
            "metric": self.stats_update_fn(stats["metric"], raw, batch),
        }

    def finalize(self, stats) -> dict[str, float]:
        """Host side: ``{'<task>/<metric>': float}`` for the whole split, plus ``'<task>/loss'``."""
        numerator, denominator = jax.device_get((stats["loss_num"], stats["loss_den"]))
        out = {f"{self.name}/loss": float(losses.loss_from_terms(numerator, denominator))}
        out.update(self.stats_finalize_fn(stats["metric"]))
        return out


def _check_options(name: str, options: Mapping, allowed: Mapping):
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    return {**allowed, **options}


def _check_loss_resolution(name: str, value: str):
    if value not in losses.LOSS_RESOLUTIONS:
        raise ValueError(f"task {name!r}: loss_resolution must be one of {losses.LOSS_RESOLUTIONS}, got {value!r}")


def _prefixed(name: str, directions) -> tuple[tuple[str, bool], ...]:
    return tuple((f"{name}/{metric}", better) for metric, better in directions)


def _softmax_last(raw):
    return jax.nn.softmax(jnp.asarray(raw, jnp.float32), axis=-1)


def _sigmoid(raw):
    return jax.nn.sigmoid(jnp.asarray(raw, jnp.float32))


def _unit_tanh(raw):
    return losses.l2_normalize(jnp.tanh(jnp.asarray(raw, jnp.float32)))


def build_segmentation(name="seg", **options) -> Task:
    opts = _check_options(
        name,
        options,
        {
            "num_classes": 40,
            "num_logits": None,
            "label_smoothing": 0.1,
            "ignore_label": 255,
            "loss_resolution": "feature",
        },
    )
    num_classes = int(opts["num_classes"])
    num_logits = int(opts["num_logits"] or num_classes)
    if num_classes < 2 or num_logits < num_classes:
        raise ValueError(
            f"task {name!r}: need num_classes >= 2 and num_logits >= num_classes, got {num_classes}, {num_logits}"
        )
    _check_loss_resolution(name, opts["loss_resolution"])
    opts["num_logits"] = num_logits
    return Task(
        name=name,
        head="deeplab",
        out_channels=num_logits,
        target_keys=(name,),
        metric_directions=_prefixed(name, [("loss", False), ("iou_paper", True), ("miou", True), ("pixel_acc", True)]),
        main_metric=f"{name}/iou_paper",
        paper_metrics=(f"{name}/iou_paper",),
        standard_metrics=(f"{name}/miou", f"{name}/pixel_acc"),
        activation=_softmax_last,
        loss_fn=functools.partial(
            losses.segmentation_loss_terms,
            label_smoothing=float(opts["label_smoothing"]),
            ignore_label=int(opts["ignore_label"]),
            loss_resolution=opts["loss_resolution"],
            task=name,
            target_key=name,
        ),
        stats_init_fn=functools.partial(metrics.segmentation_init_stats, num_classes, num_logits),
        stats_update_fn=functools.partial(
            metrics.segmentation_update_stats,
            num_classes=num_classes,
            ignore_label=int(opts["ignore_label"]),
            target_key=name,
        ),
        stats_finalize_fn=functools.partial(metrics.segmentation_finalize, prefix=name),
        options=tuple(sorted(opts.items())),
    )


def build_depth(name="depth", **options) -> Task:
    opts = _check_options(name, options, {"loss_resolution": "feature"})
    _check_loss_resolution(name, opts["loss_resolution"])
    return Task(
        name=name,
        head="deeplab",
        out_channels=1,
        target_keys=(name, f"{name}_valid", f"{name}_scale"),
        metric_directions=_prefixed(
            name,
            [("loss", False), ("mae_paper", False), ("mse_paper", False), ("abs_err_m", False), ("rel_err", False)],
        ),
        main_metric=f"{name}/mae_paper",
        paper_metrics=(f"{name}/mae_paper", f"{name}/mse_paper"),
        standard_metrics=(f"{name}/abs_err_m", f"{name}/rel_err"),
        activation=_sigmoid,
        loss_fn=functools.partial(
            losses.depth_loss_terms, loss_resolution=opts["loss_resolution"], task=name, target_key=name
        ),
        stats_init_fn=metrics.depth_init_stats,
        stats_update_fn=functools.partial(
            metrics.depth_update_stats, target_key=name, valid_key=f"{name}_valid", scale_key=f"{name}_scale"
        ),
        stats_finalize_fn=functools.partial(metrics.depth_finalize, prefix=name),
        options=tuple(sorted(opts.items())),
    )


def build_normals(name="normals", **options) -> Task:
    opts = _check_options(name, options, {"loss_resolution": "feature"})
    _check_loss_resolution(name, opts["loss_resolution"])
    angle_names = ("angle_mean", "angle_median", "angle_rmse")
    pct_names = tuple(f"pct_{t:g}" for t in metrics.ANGLE_THRESHOLDS_DEG)
    return Task(
        name=name,
        head="deeplab",
        out_channels=3,
        target_keys=(name,),
        metric_directions=_prefixed(
            name,
            [("loss", False), ("cos_paper", True)] + [(n, False) for n in angle_names] + [(n, True) for n in pct_names],
        ),
        main_metric=f"{name}/angle_mean",
        paper_metrics=(f"{name}/cos_paper",) + tuple(f"{name}/{n}" for n in angle_names + pct_names),
        standard_metrics=(f"{name}/angle_mean", f"{name}/angle_median"),
        activation=_unit_tanh,
        loss_fn=functools.partial(
            losses.normals_loss_terms, loss_resolution=opts["loss_resolution"], task=name, target_key=name
        ),
        stats_init_fn=metrics.normals_init_stats,
        stats_update_fn=functools.partial(metrics.normals_update_stats, target_key=name),
        stats_finalize_fn=functools.partial(metrics.normals_finalize, prefix=name),
        options=tuple(sorted(opts.items())),
    )


def build_edge(name="edge", **options) -> Task:
    opts = _check_options(name, options, {"loss_resolution": "feature", "delta": 0.2})
    _check_loss_resolution(name, opts["loss_resolution"])
    return Task(
        name=name,
        head="deeplab",
        out_channels=1,
        target_keys=(name,),
        metric_directions=_prefixed(name, [("loss", False), ("mae_paper", False)]),
        main_metric=f"{name}/mae_paper",
        paper_metrics=(f"{name}/mae_paper",),
        standard_metrics=(),
        activation=_sigmoid,
        loss_fn=functools.partial(
            losses.edge_loss_terms,
            delta=float(opts["delta"]),
            loss_resolution=opts["loss_resolution"],
            task=name,
            target_key=name,
        ),
        stats_init_fn=metrics.edge_init_stats,
        stats_update_fn=functools.partial(metrics.edge_update_stats, target_key=name),
        stats_finalize_fn=functools.partial(metrics.edge_finalize, prefix=name),
        options=tuple(sorted(opts.items())),
    )


def build_attribute(name, **options) -> Task:
    opts = _check_options(name, options, {"double_sigmoid": False})
    return Task(
        name=name,
        head="classification",
        out_channels=1,
        target_keys=(name,),
        metric_directions=_prefixed(name, [("loss", False), ("acc_paper", True), ("f1_weighted", True), ("acc", True)]),
        main_metric=f"{name}/acc_paper",
        paper_metrics=(f"{name}/acc_paper", f"{name}/f1_weighted"),
        standard_metrics=(f"{name}/acc",),
        activation=_sigmoid,
        loss_fn=functools.partial(
            losses.attribute_loss_terms, double_sigmoid=bool(opts["double_sigmoid"]), task=name, target_key=name
        ),
        stats_init_fn=metrics.attribute_init_stats,
        stats_update_fn=functools.partial(metrics.attribute_update_stats, target_key=name),
        stats_finalize_fn=functools.partial(metrics.attribute_finalize, prefix=name),
        options=tuple(sorted(opts.items())),
    )


# Adding a task = one entry here: name -> builder(name, **options) -> Task.
TASK_BUILDERS: dict[str, Callable[..., Task]] = {
    "seg": build_segmentation,
    "depth": build_depth,
    "normals": build_normals,
    "edge": build_edge,
    "male": build_attribute,
    "smile": build_attribute,
    "eyebrows": build_attribute,
    "glasses": build_attribute,
}


def task_names() -> tuple[str, ...]:
    return tuple(TASK_BUILDERS)


def get_task(name: str, **options) -> Task:
    """The registered task ``name`` built with ``options`` (e.g. num_classes, num_logits, loss_resolution,
    double_sigmoid). Unknown names or options raise a one-line ValueError listing what exists."""
    if name not in TASK_BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_BUILDERS)}")
    return TASK_BUILDERS[name](name, **options)


def main_metric(task: Task | str) -> str:
    """The metric shown in progress bars and used for per-task best checkpoints (e.g. 'seg/iou_paper')."""
    return (get_task(task) if isinstance(task, str) else task).main_metric


def paper_table_columns(dataset: str) -> tuple[str, ...]:
    """Metric columns of the paper's tables: 'nyu' (Tables 1 and 3) or 'celeba' (Table 2)."""
    if dataset not in PAPER_TABLE_COLUMNS:
        raise ValueError(f"unknown dataset {dataset!r}; paper tables exist for {sorted(PAPER_TABLE_COLUMNS)}")
    return PAPER_TABLE_COLUMNS[dataset]


def higher_is_better(metric_names, tasks: Mapping[str, Task] | None = None) -> dict[str, bool]:
    """``{'<task>/<metric>': bool}`` for the given metric names, looked up in ``tasks`` (or default tasks)."""
    out = {}
    for full_name in metric_names:
        task_name, _, metric_name = full_name.partition("/")
        task = (tasks or {}).get(task_name) or get_task(task_name)
        directions = task.higher_is_better
        if full_name not in directions:
            raise ValueError(f"task {task_name!r} has no metric {metric_name!r}; its metrics: {sorted(directions)}")
        out[full_name] = directions[full_name]
    return out
