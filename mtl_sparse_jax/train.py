"""Training and evaluation: a pure, jitted, data-parallel train step and the loops around it.

The train step is a pure function of (state, batch, rng). It runs under `jax.jit` over a 1-D device mesh with
axis 'data': the batch is sharded over it, the state is replicated, so BatchNorm sees the global batch and
`batch_size` is the global batch. The optimizer is `sparsity.prox_adamw` (or a torch-style dense Adam) over all
parameters, with channel groups only on the backbone's conv kernels.

`train_and_evaluate(config, workdir)` runs `config.num_trials` trials; each resumes from its latest checkpoint
when the same command is run again on the same workdir. Outputs are documented in the README ("Run outputs").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections import deque
from typing import Any, Iterable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_sparse_jax import checkpoint as ckpt_lib
from mtl_sparse_jax import config_utils, models, report, sparsity
from mtl_sparse_jax import losses as losses_lib
from mtl_sparse_jax import tasks as tasks_lib

LOSS_WEIGHTS_KEY = "loss_weights"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the message names the step and the task."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'backbone', 'head_<task>', ..., 'loss_weights'}
    batch_stats: Any
    opt_state: Any
    task_active: dict  # task -> 0./1. float32; a stopped task leaves the loss and its head freezes


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def make_mesh(devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), ("data",))


def build_tasks(config) -> dict[str, tasks_lib.Task]:
    out = {}
    for name in config.tasks:
        options = {}
        if name == "seg":
            options["num_classes"] = config.seg_num_classes
            options["num_logits"] = config.seg_num_logits or config.seg_num_classes
        options["loss_resolution"] = config.loss_resolution
        if name in tasks_lib.ATTRIBUTE_TASKS:
            options["double_sigmoid"] = config.double_sigmoid
        out[name] = tasks_lib.get_task(name, **options)
    return out


def build_model(config, task_specs) -> models.MultiTaskModel:
    heads = [models.HeadSpec(name=t.name, kind=t.head, out_channels=t.out_channels) for t in task_specs.values()]
    return models.MultiTaskModel(
        heads=heads,
        depth=config.model.depth,
        width_multiplier=config.model.width_multiplier,
        head_width_multiplier=config.model.head_width_multiplier,
        output_stride=config.model.output_stride,
        dtype=jnp.dtype(config.model.dtype),
    )


def group_axes_for(config, params):
    return sparsity.group_axes_by_regex(params, rules=((config.sparsity.group_rule, 2),), ndim=4)


def build_optimizer(config, group_axes) -> optax.GradientTransformation:
    o = config.optimizer
    if o.name == "prox_adamw":
        # Only lr and lam are injected (changeable at run time without recompiling); the betas stay Python floats,
        # since 1 - b2 computed in float32 would be off by ~1e-5 relative.
        make = functools.partial(
            sparsity.prox_adamw,
            group_axes=group_axes,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            prox=config.sparsity.prox,
        )
        return optax.inject_hyperparams(
            make,
            static_args=("group_axes", "b1", "b2", "eps", "weight_decay", "prox", "max_iter", "tol"),
            hyperparam_dtype=jnp.float32,
        )(learning_rate=o.lr, lam=config.sparsity.lam)
    if o.name == "adam_l2":
        # torch.optim.Adam(weight_decay=wd): L2 added to the gradient before the moments, eps 1e-8.
        def make_adam_l2(learning_rate, lam):
            del lam  # a dense optimizer; kept so that logging reads both hyperparameters the same way
            return optax.chain(
                optax.add_decayed_weights(o.weight_decay), optax.adam(learning_rate, o.b1, o.b2, eps=1e-8)
            )

        return optax.inject_hyperparams(make_adam_l2, hyperparam_dtype=jnp.float32)(learning_rate=o.lr, lam=0.0)
    raise config_utils.ConfigError(f"unknown optimizer.name {o.name!r}; use 'prox_adamw' or 'adam_l2'")


def _split_params(params):
    model_params = {k: v for k, v in params.items() if k != LOSS_WEIGHTS_KEY}
    return model_params, params.get(LOSS_WEIGHTS_KEY, {})


def _fixed_weights(config) -> dict | None:
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
    return weights


# ----------------------------------------------------------------------------------------------------------------
# The trainer: static parts and jitted functions


class Trainer:
    """Holds the model, optimizer, mesh and jitted step functions for one config."""

    def __init__(self, config: ml_collections.ConfigDict, *, devices=None):
        self.config = config
        self.tasks = build_tasks(config)
        self.task_names = tuple(self.tasks)
        self.model = build_model(config, self.tasks)
        self.mesh = make_mesh(devices)
        self.num_devices = self.mesh.devices.size
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        if config.batch_size % (self.num_devices) != 0:
            raise config_utils.ConfigError(
                f"batch_size={config.batch_size} is not divisible by the {self.num_devices} devices; "
                f"set --config.batch_size to a multiple of {self.num_devices}"
            )
        self.fixed_weights = _fixed_weights(config)
        self.image_size = None  # set by init_state
        self._abstract_state = None
        self.group_axes = None
        self.tx = None
        self._train_step = None
        self._eval_step = None

    # -- state ------------------------------------------------------------------------------------------------------

    def _init_fn(self, rng, image):
        variables = self.model.init({"params": rng, "dropout": rng}, image, train=False)
        params = dict(variables["params"])
        params[LOSS_WEIGHTS_KEY] = losses_lib.init_loss_weights(self.config.loss.combiner, self.task_names)
        batch_stats = variables.get("batch_stats", {})
        opt_state = self.tx.init(params)
        active = {t: jnp.ones((), jnp.float32) for t in self.task_names}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            task_active=active,
        )

    def setup(self, image_size: tuple[int, int]):
        """Traces shapes once: group axes, optimizer, abstract state and the jitted steps."""
        self.image_size = tuple(image_size)
        dummy = jax.ShapeDtypeStruct((1, *self.image_size, 3), jnp.float32)
        variables = jax.eval_shape(
            lambda r, x: self.model.init({"params": r, "dropout": r}, x, train=False), jax.random.PRNGKey(0), dummy
        )
        params = dict(variables["params"])
        params[LOSS_WEIGHTS_KEY] = jax.eval_shape(
            lambda: losses_lib.init_loss_weights(self.config.loss.combiner, self.task_names)
        )
        self.group_axes = group_axes_for(self.config, params)
        self.tx = build_optimizer(self.config, self.group_axes)
        self._abstract_state = jax.eval_shape(self._init_fn, jax.random.key(0, impl="rbg"), dummy)
        self._train_step = jax.jit(
            self._train_step_impl,
            donate_argnums=(0,),
            out_shardings=(self.replicated, self.replicated, self.replicated),
        )
        self._eval_step = jax.jit(self._eval_step_impl, static_argnames=("train_mode",), donate_argnums=(2,))
        self._train_stats_init = jax.jit(self._init_train_stats, out_shardings=self.replicated)

    def init_state(self, seed: int) -> TrainState:
        """Creates the train state directly on the mesh, replicated, with the config's lr and lam.

        Parameters are drawn with the 'rbg' generator: on the CPU, XLA compiles threefry-based init of a deep
        network an order of magnitude slower, and init runs replicated, so the result is the same on any mesh.
        """
        dummy = jnp.zeros((1, *self.image_size, 3), jnp.float32)
        init = jax.jit(self._init_fn, out_shardings=self.replicated)
        state = init(jax.random.key(seed, impl="rbg"), dummy)
        return self.set_hyperparams(state, learning_rate=self.config.optimizer.lr, lam=self.config.sparsity.lam)

    def abstract_state(self):
        return ckpt_lib.abstract_like(self._abstract_state, self.replicated)

    def reset_optimizer(self, state: TrainState) -> TrainState:
        """Fresh moments and step count (the reference's per-epoch optimizer rebuild); same lr and lam."""
        hp = state.opt_state.hyperparams
        opt_state = jax.jit(self.tx.init, out_shardings=self.replicated)(state.params)
        return state.replace(opt_state=opt_state._replace(hyperparams=hp))

    def set_hyperparams(self, state: TrainState, **values) -> TrainState:
        hp = dict(state.opt_state.hyperparams)
        for k, v in values.items():
            hp[k] = jax.device_put(jnp.asarray(v, hp[k].dtype), self.replicated)
        return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))

    # -- losses ---------------------------------------------------------------------------------------------------

    def _task_losses(self, outputs, batch):
        out = {}
        for name, task in self.tasks.items():
            num, den = task.loss_terms(outputs[name], batch)
            out[name] = num / jnp.maximum(den, 1e-12)
        return out

    def _total(self, task_losses, loss_weights, active):
        return losses_lib.combine_losses(
            self.config.loss.combiner, task_losses, loss_weights, active=active, fixed_weights=self.fixed_weights
        )

    def _init_train_stats(self):
        stats = {name: task.init_stats() for name, task in self.tasks.items()} if self.config.log.train_metrics else {}
        stats["_loss"] = {k: jnp.zeros((), jnp.float32) for k in ("total", "count", *self.task_names)}
        return stats

    # -- steps ----------------------------------------------------------------------------------------------------

    def _train_step_impl(self, state: TrainState, batch, rng, train_stats):
        config = self.config
        dropout_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            model_params, loss_weights = _split_params(params)
            outputs, new_vars = self.model.apply(
                {"params": model_params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            task_losses = self._task_losses(outputs, batch)
            total = self._total(task_losses, loss_weights, state.task_active)
            if config.sparsity.penalty_in_loss:
                lam = state.opt_state.hyperparams["lam"]
                total = total + sparsity.group_lasso_penalty(params, self.group_axes, lam, weighting="num_groups")
            return total, (task_losses, new_vars["batch_stats"], outputs)

        (total, (task_losses, new_batch_stats, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, new_opt_state = self.tx.update(grads, state.opt_state, state.params)
        # A stopped task's head is frozen: no gradient step, no weight decay.
        updates = {
            k: (
                jax.tree.map(lambda u: u * state.task_active[k[len("head_") :]], v)
                if k.startswith("head_") and k[len("head_") :] in state.task_active
                else v
            )
            for k, v in updates.items()
        }
        new_params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=new_params, batch_stats=new_batch_stats, opt_state=new_opt_state
        )
        step_losses = {"total": total, **task_losses}
        if config.log.train_metrics:
            train_stats = dict(train_stats)
            for name, task in self.tasks.items():
                train_stats[name] = task.update_stats(train_stats[name], jax.lax.stop_gradient(outputs[name]), batch)
        loss_acc = dict(train_stats["_loss"])
        loss_acc["total"] = loss_acc["total"] + total
        loss_acc["count"] = loss_acc["count"] + 1.0
        for name in self.task_names:
            loss_acc[name] = loss_acc[name] + task_losses[name]
        train_stats = {**train_stats, "_loss": loss_acc}
        return new_state, step_losses, train_stats

    def _eval_step_impl(self, params, batch_stats, acc, batch, rng, *, train_mode: bool):
        model_params, _ = _split_params(params)
        variables = {"params": model_params, "batch_stats": batch_stats}
        if train_mode:
            outputs, _ = self.model.apply(
                variables, batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": rng}
            )
        else:
            outputs = self.model.apply(variables, batch["image"], train=False)
        return {name: task.update_stats(acc[name], outputs[name], batch) for name, task in self.tasks.items()}

    def _init_eval_acc(self):
        return {name: task.init_stats() for name, task in self.tasks.items()}

    # -- host-side loops --------------------------------------------------------------------------------------------

    def put_batch(self, batch: dict[str, np.ndarray]):
        """Places a process-local numpy batch on the mesh, sharded along the batch axis (jax.Arrays pass as is)."""
        return {
            k: v if isinstance(v, jax.Array) else jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()
        }

    def prefetch(self, batches: Iterable[dict], size: int = 2) -> Iterator[dict]:
        queue: deque = deque()
        it = iter(batches)
        for batch in it:
            queue.append(self.put_batch(batch))
            if len(queue) >= size:
                yield queue.popleft()
        while queue:
            yield queue.popleft()

    def evaluate(
        self,
        params,
        batch_stats,
        batches: Iterable[dict],
        *,
        train_mode: bool = False,
        seed: int = 0,
        loss_weights=None,
        active=None,
    ) -> dict[str, float]:
        """Metrics and losses over a whole split (all examples, padding ignored), in eval mode by default."""
        acc = jax.jit(self._init_eval_acc, out_shardings=self.replicated)()
        rng = jax.random.PRNGKey(seed)
        for i, batch in enumerate(self.prefetch(batches)):
            acc = self._eval_step(params, batch_stats, acc, batch, jax.random.fold_in(rng, i), train_mode=train_mode)
        acc = jax.device_get(acc)
        out: dict[str, float] = {}
        task_losses = {}
        for name, task in self.tasks.items():
            values = task.finalize(acc[name])
            task_losses[name] = values.pop(f"{name}/loss")
            out[f"loss/{name}"] = task_losses[name]
            out.update({k: float(v) for k, v in values.items()})
        lw = params[LOSS_WEIGHTS_KEY] if loss_weights is None else loss_weights
        all_active = {t: jnp.ones((), jnp.float32) for t in self.task_names}
        out["loss/total"] = float(
            self._total(
                {k: jnp.float32(v) for k, v in task_losses.items()}, lw, all_active if active is None else active
            )
        )
        return out


# ----------------------------------------------------------------------------------------------------------------
# Trials


@dataclasses.dataclass
class EarlyStopper:
    """Stops after `patience` evaluations without improvement; an equal value counts as improvement."""

    patience: int
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, value: float, epoch: int) -> bool:
        """Records `value`; returns True when it is a new best (not worse than the best so far)."""
        if value <= self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        if self.patience > 0 and self.bad_epochs >= self.patience:
            self.stopped = True
        return False


def _sparsity_summary(trainer: Trainer, params) -> dict:
    stats = sparsity.stats(params, trainer.group_axes, layer_order=_layer_order(trainer))
    return stats


def _layer_order(trainer: Trainer):
    return [f"backbone/{name}/kernel" for name in models.conv_paths(trainer.config.model.depth)]


class _JsonlWriter:
    def __init__(self, path: str):
        self.path = path

    def rewrite(self, records: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()


def _check_finite(step: int, epoch: int, losses: dict[str, float], ckpt_dir: str, last_good: int | None):
    for name, value in losses.items():
        if not np.isfinite(value):
            where = (
                f"the last good checkpoint (epoch {last_good}) is kept in {ckpt_dir}"
                if last_good is not None
                else "no checkpoint was written yet"
            )
            task = "the total loss" if name == "total" else f"task '{name}'"
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {epoch}) in {task}: loss/{name}={value}; {where}. "
                f"Lower --config.optimizer.lr or check the data of that task"
            )


def run_trial(trainer: Trainer, config, trial_dir: str, trial: int, data) -> dict:
    """Trains one trial (resuming if possible), then evaluates the test split. Returns the test metrics."""
    from mtl_sparse_jax.data import pipeline as input_pipeline  # TensorFlow is imported here, not at package import

    os.makedirs(trial_dir, exist_ok=True)
    seed = config.seed + trial
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(trial_dir, "checkpoints"))
    jsonl = _JsonlWriter(os.path.join(trial_dir, "metrics.jsonl"))
    process_count = jax.process_count()
    local_batch = config.batch_size // process_count
    eval_batch = _eval_batch_size(config, trainer.num_devices, process_count)
    steps = input_pipeline.steps_per_epoch(data.dir, "train", local_batch, train=True, process_count=process_count)
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    if steps == 0:
        raise config_utils.ConfigError(
            f"the train split of {data.dir} has fewer examples than batch_size={config.batch_size}; lower it"
        )

    def batches(split, train, epoch, batch_size):
        return _batch_reader(trainer, data, split)(
            data.dir,
            split,
            tasks=trainer.task_names,
            batch_size=batch_size,
            train=train,
            seed=seed,
            epoch=epoch,
            depth_norm=data.depth_norm,
            depth_max_m=data.depth_max_m,
        )

    # ---- restore or init
    history: list[dict] = []
    es = EarlyStopper(config.early_stopping.patience)
    task_es = {t: EarlyStopper(config.early_stopping.task_patience) for t in trainer.task_names}
    start_epoch = 0
    if ckpts.latest_epoch("latest") is not None:
        state, meta = ckpts.restore("latest", trainer.abstract_state())
        history = meta["history"]
        es = EarlyStopper(**meta["early_stopping"])
        task_es = {t: EarlyStopper(**v) for t, v in meta["task_early_stopping"].items()}
        start_epoch = meta["epoch"] + 1
        # The config may change lr or lam between runs; the restored optimizer state takes the config's values.
        state = trainer.set_hyperparams(state, learning_rate=config.optimizer.lr, lam=config.sparsity.lam)
        jsonl.rewrite(history)
        print(f"trial {trial}: resumed from epoch {meta['epoch']} ({trial_dir})", flush=True)
    else:
        state = trainer.init_state(seed)
        jsonl.rewrite([])
    last_good = start_epoch - 1 if start_epoch > 0 else None

    tb = report.SummaryWriter(trial_dir)
    rng = jax.random.PRNGKey(seed + 10_000)
    done = es.stopped or all(s.stopped for s in task_es.values())
    host_step = int(state.step)
    for epoch in range(start_epoch, config.num_epochs):
        if done:
            break
        if config.optimizer.reset_each_epoch:
            state = trainer.reset_optimizer(state)
        train_stats = trainer._train_stats_init()
        bar = report.progress(steps, desc=f"trial {trial} epoch {epoch}", enabled=config.log.progress)
        t0 = t1 = time.perf_counter()
        pending = None
        step_it = trainer.prefetch(batches("train", True, epoch, local_batch))
        for i in range(steps):
            batch = next(step_it)
            state, step_losses, train_stats = trainer._train_step(state, batch, rng, train_stats)
            if pending is not None:  # check the previous step's losses while this one runs
                _check_finite(pending[0], epoch, jax.device_get(pending[1]), ckpts.directory, last_good)
            host_step += 1
            pending = (host_step, step_losses)
            if i == 0:
                jax.block_until_ready(step_losses)
                t1 = time.perf_counter()  # steady-state timing excludes the first (compiling) step
            bar.update(1)
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{float(step_losses['total']):.4f}")
        last = jax.device_get(pending[1])
        _check_finite(pending[0], epoch, last, ckpts.directory, last_good)
        jax.block_until_ready(state)
        t_end = time.perf_counter()
        timed_steps = steps - 1
        images_per_sec = (
            (timed_steps * config.batch_size / (t_end - t1)) if timed_steps > 0 else config.batch_size / (t_end - t0)
        )

        # ---- epoch summary
        hp = jax.device_get(state.opt_state.hyperparams)
        sp = _sparsity_summary(trainer, state.params)
        common = {
            "trial": trial,
            "epoch": epoch,
            "lam": float(hp["lam"]),
            "lr": float(hp["learning_rate"]),
            "sparsity/group": float(sp["group_sparsity"]),
            "sparsity/param": float(sp["param_sparsity"]),
        }
        ts = jax.device_get(train_stats)
        n = max(float(ts["_loss"]["count"]), 1.0)
        train_rec = {
            **common,
            "split": "train",
            "loss/total": float(ts["_loss"]["total"]) / n,
            **{f"loss/{t}": float(ts["_loss"][t]) / n for t in trainer.task_names},
            "images_per_sec": images_per_sec,
        }
        if config.log.train_metrics:
            for name, task in trainer.tasks.items():
                values = task.finalize(ts[name])
                values.pop(f"{name}/loss")
                train_rec.update({k: float(v) for k, v in values.items()})
        val = trainer.evaluate(state.params, state.batch_stats, batches("val", False, epoch, eval_batch), seed=seed)
        val_rec = {**common, "split": "val", **val, "images_per_sec": images_per_sec}
        bar.set_postfix_str(report.postfix(val_rec, trainer.tasks))
        bar.close()

        # ---- early stopping and best checkpoints
        best_state = {"params": state.params, "batch_stats": state.batch_stats}
        if es.update(val["loss/total"], epoch):
            ckpts.save("best", epoch, best_state, {"epoch": epoch, "val": val_rec})
        for t in trainer.task_names:
            if task_es[t].stopped:
                continue
            if task_es[t].update(val[f"loss/{t}"], epoch):
                ckpts.save(f"best_{t}", epoch, best_state, {"epoch": epoch, "val": val_rec})
            if task_es[t].stopped and len(trainer.task_names) > 1:
                state = state.replace(
                    task_active={**state.task_active, t: jax.device_put(jnp.zeros((), jnp.float32), trainer.replicated)}
                )
                print(
                    f"trial {trial}: task {t} stopped at epoch {epoch} (best epoch {task_es[t].best_epoch}); "
                    f"its head is frozen",
                    flush=True,
                )
        done = es.stopped or all(s.stopped for s in task_es.values())

        records = [train_rec, val_rec]
        history.extend(records)
        meta = {
            "epoch": epoch,
            "history": history,
            "early_stopping": dataclasses.asdict(es),
            "task_early_stopping": {t: dataclasses.asdict(s) for t, s in task_es.items()},
            "per_layer": [list(x) for x in sp["per_layer"]],
        }
        ckpts.save("latest", epoch, state, meta)
        last_good = epoch
        jsonl.append(records)
        tb.write(epoch, records)
        if done:
            print(f"trial {trial}: early stopping at epoch {epoch} (best epoch {es.best_epoch})", flush=True)

    tb.close()
    test = evaluate_trial(trainer, config, trial_dir, trial, data, ckpts=ckpts, history=history)
    ckpts.close()
    return test


def _batch_reader(trainer: Trainer, data, split: str):
    """data.loader='device': arrays resident on the mesh (no TensorFlow once decoded) for a split that fits on
    every device; otherwise, or with 'tfdata', tf.data's numpy batches (placed by Trainer.put_batch)."""
    if data.loader == "device":
        from mtl_sparse_jax.data import device as device_loader

        if device_loader.fits(data.dir, split, trainer.task_names, trainer.mesh):
            return functools.partial(device_loader.iterate_batches, sharding=trainer.batch_sharding)
        print(f"split '{split}' does not fit on the devices; reading it with tf.data", flush=True)
    from mtl_sparse_jax.data import pipeline as input_pipeline

    return input_pipeline.iterate_batches


def _eval_batch_size(config, num_devices: int, process_count: int) -> int:
    """Per-process eval batch: at least config.eval_batch_size globally, divisible over the local devices."""
    local_devices = max(num_devices // process_count, 1)
    per_process = max(config.eval_batch_size // process_count, 1)
    return int(math.ceil(per_process / local_devices) * local_devices)


def evaluate_trial(trainer: Trainer, config, trial_dir: str, trial: int, data, *, ckpts=None, history=None) -> dict:
    """Restores the selected checkpoint(s) of a trial and evaluates the test split; writes test_metrics.json."""
    own = ckpts is None
    ckpts = ckpts or ckpt_lib.TrialCheckpoints(os.path.join(trial_dir, "checkpoints"))
    seed = config.seed + trial
    eval_batch = _eval_batch_size(config, trainer.num_devices, jax.process_count())
    abstract = trainer.abstract_state()
    abstract_best = {"params": abstract.params, "batch_stats": abstract.batch_stats}

    def test_batches():
        return _batch_reader(trainer, data, "test")(
            data.dir,
            "test",
            tasks=trainer.task_names,
            batch_size=eval_batch,
            train=False,
            seed=seed,
            epoch=0,
            depth_norm=data.depth_norm,
            depth_max_m=data.depth_max_m,
        )

    def run(name):
        best, meta = ckpts.restore(name, abstract_best)
        metrics = trainer.evaluate(
            best["params"], best["batch_stats"], test_batches(), train_mode=config.eval.train_mode, seed=seed
        )
        return best, meta, metrics

    best, meta, metrics = run("best")
    result = {"trial": trial, "checkpoint": "best", "epoch": meta["epoch"], **metrics}
    if config.eval.checkpoint == "per_task" and len(trainer.task_names) > 1:
        # As the reference's main_multi_trials: each task's numbers from the weights at its own best epoch.
        for t, task in trainer.tasks.items():
            if not ckpts.exists(f"best_{t}"):
                continue
            _, meta_t, metrics_t = run(f"best_{t}")
            for k, v in metrics_t.items():
                if k.startswith(f"{t}/") or k == f"loss/{t}":
                    result[k] = v
            result[f"epoch/{t}"] = meta_t["epoch"]
        result["checkpoint"] = "per_task"
    sp = _sparsity_summary(trainer, best["params"])
    result["sparsity/group"] = float(sp["group_sparsity"])
    result["sparsity/param"] = float(sp["param_sparsity"])
    result["sparsity/zero_output_filters"] = int(sp["zero_output_filters"])
    result["eval_mode"] = "train (reference compat)" if config.eval.train_mode else "eval"
    report.write_json(os.path.join(trial_dir, "test_metrics.json"), result)
    if history is None and os.path.exists(os.path.join(trial_dir, "metrics.jsonl")):
        with open(os.path.join(trial_dir, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
    report.plot_sparsity_layers(
        sp["per_layer"],
        os.path.join(trial_dir, "sparsity_layers.png"),
        title=f"{', '.join(trainer.task_names)} — group sparsity {sp['group_sparsity']:.1f}% (trial {trial})",
    )
    if history:
        report.plot_sparsity_curve(history, os.path.join(trial_dir, "sparsity_curve.png"))
    if own:
        ckpts.close()
    return result


def _prepare_data(config):
    from mtl_sparse_jax.data import spec as data_spec

    data = config.data
    manifest_path = os.path.join(data.dir, "manifest.json")
    if config.dataset == "synthetic" and data.generate_if_missing and not os.path.exists(manifest_path):
        if jax.process_index() == 0:  # one writer; on several hosts the others wait for its manifest
            from data_prep import synthetic

            print(f"generating the synthetic demo dataset in {data.dir} (first use)", flush=True)
            synthetic.generate(
                data.dir,
                num_train=data.synthetic_num_train,
                num_val=data.synthetic_num_val,
                num_test=data.synthetic_num_test,
                image_size=data.synthetic_size,
                seed=config.seed,
                num_classes=config.seg_num_classes,
            )
        else:
            deadline = time.time() + 1800
            while not os.path.exists(manifest_path):
                if time.time() > deadline:
                    raise data_spec.DataError(
                        f"{manifest_path} did not appear within 30 min while process 0 generated "
                        f"the demo data; generate it first with python -m data_prep.synthetic"
                    )
                time.sleep(2)
    manifest = data_spec.load_manifest(data.dir, verify=data.verify)
    return manifest


# Fields that the traced train/eval steps depend on. lr and lam are not among them: they live in the optimizer
# state (optax.inject_hyperparams), so changing them reuses the compiled steps.
_STRUCTURAL_KEYS = (
    "tasks",
    "seg_num_classes",
    "seg_num_logits",
    "loss_resolution",
    "double_sigmoid",
    "model",
    "optimizer.name",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "optimizer.weight_decay",
    "sparsity.prox",
    "sparsity.group_rule",
    "sparsity.penalty_in_loss",
    "loss",
    "log.train_metrics",
    "batch_size",
)
_TRAINERS: dict = {}
_MAX_TRAINERS = 4


def get_trainer(config, image_size, *, devices=None) -> Trainer:
    """A set-up Trainer, reused within a process when nothing structural changed (no recompilation)."""
    values = config_utils.to_dict(config)

    def pick(path):
        node = values
        for part in path.split("."):
            node = node[part]
        return node

    devices = list(jax.devices() if devices is None else devices)
    key = json.dumps(
        [[k, pick(k)] for k in _STRUCTURAL_KEYS] + [[d.id for d in devices], list(image_size)],
        sort_keys=True,
        default=str,
    )
    trainer = _TRAINERS.pop(key, None)
    if trainer is None:
        trainer = Trainer(config, devices=devices)
        trainer.setup(tuple(image_size))
    _TRAINERS[key] = trainer  # most recently used last
    while len(_TRAINERS) > _MAX_TRAINERS:  # compiled executables of big models hold memory
        _TRAINERS.pop(next(iter(_TRAINERS)))
    trainer.config = config
    return trainer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> list[dict]:
    """Runs every trial in `workdir` (resuming), writes results.csv / results.md; returns the test metrics."""
    config_utils.validate(config)
    manifest = _prepare_data(config)
    os.makedirs(workdir, exist_ok=True)
    config_utils.save(config, os.path.join(workdir, "config.json"))
    trainer = get_trainer(config, manifest["image_size"], devices=devices)
    results = []
    for trial in range(config.num_trials):
        trial_dir = os.path.join(workdir, f"trial_{trial}")
        done_path = os.path.join(trial_dir, "test_metrics.json")
        if os.path.exists(done_path):
            with open(done_path) as f:
                results.append(json.load(f))
            print(f"trial {trial}: already finished ({done_path})", flush=True)
            continue
        results.append(run_trial(trainer, config, trial_dir, trial, config.data))
    report.write_results(workdir, results, trainer.tasks)
    return results


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> list[dict]:
    """Restores every trained trial in `workdir` and evaluates its test split, on whatever devices are present."""
    config_utils.validate(config)
    manifest = _prepare_data(config)
    trainer = get_trainer(config, manifest["image_size"], devices=devices)
    results = []
    for trial in range(config.num_trials):
        trial_dir = os.path.join(workdir, f"trial_{trial}")
        if not os.path.isdir(os.path.join(trial_dir, "checkpoints", "best")):
            continue
        results.append(evaluate_trial(trainer, config, trial_dir, trial, config.data))
    if not results:
        raise FileNotFoundError(
            f"no trained trial with a best checkpoint under {workdir}; train first with --mode train"
        )
    report.write_results(workdir, results, trainer.tasks)
    return results
