"""Trials: the epoch loop (resume, early stopping, checkpoints, logs) and the test evaluation of a trial.

`train_and_evaluate(config, workdir)` runs `config.num_trials` trials; each resumes from its latest checkpoint
when the same command is run again on the same workdir. `run_trial` takes a `Batches` source, a function
`(split, train, epoch, batch_size) -> iterable of process-local batches`, so any data source (tf.data over
shards, device-resident arrays, tfds) feeds the same loop. Outputs are documented in the README ("Run outputs")
and written by process 0 only (`report`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_sparse_jax import checkpoint as ckpt_lib
from mtl_sparse_jax import config_utils, report, sparsity
from mtl_sparse_jax.training import evaluation as evaluate_lib
from mtl_sparse_jax.training import state as state_lib
from mtl_sparse_jax.training import step as step_lib
from mtl_sparse_jax.training.spec import StepSpec, step_spec

Batches = Callable[[str, bool, int, int], Iterable[dict]]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the message names the step and the task."""


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


def layer_order(spec: StepSpec) -> list[str]:
    """Grouped backbone kernels in forward order (for per-layer statistics and plots)."""
    return [f"backbone/{name}/kernel" for name in spec.model.backbone_conv_paths()]


def sparsity_summary(spec: StepSpec, params) -> dict:
    """`sparsity.stats` of the model params' grouped kernels, per layer in forward order."""
    return sparsity.stats(params, spec.group_axes(params), layer_order=layer_order(spec))


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


def eval_batch_size(config, num_devices: int, process_count: int) -> int:
    """Per-process eval batch: at least config.eval_batch_size globally, divisible over the local devices."""
    local_devices = max(num_devices // process_count, 1)
    per_process = max(config.eval_batch_size // process_count, 1)
    return int(math.ceil(per_process / local_devices) * local_devices)


def shard_batches(config, spec: StepSpec, seed: int) -> Batches:
    """Batches of the config's dataset: tf.data over the shards or a tfds directory (TensorFlow imported on first
    use), or with data.loader='device' the splits resident on the mesh (no TensorFlow once decoded)."""
    from mtl_sparse_jax.data import pipeline

    data = config.data

    def reader(split: str):
        if data.loader == "device" and data.format == "shards":  # resident on the mesh; no TensorFlow once decoded
            from mtl_sparse_jax.data import device

            if device.fits(data.dir, split, spec.task_names, spec.mesh):
                return device.iterate_batches, {"sharding": spec.batch_sharding}
            print(f"split '{split}' does not fit on the devices; reading it with tf.data", flush=True)
        return pipeline.iterate_batches, {"data_format": data.format, "features": data.features}

    def batches(split: str, train: bool, epoch: int, batch_size: int):
        read, extra = reader(split)
        return read(
            data.dir,
            split,
            tasks=spec.task_names,
            batch_size=batch_size,
            train=train,
            seed=seed,
            epoch=epoch,
            depth_norm=data.depth_norm,
            depth_max_m=data.depth_max_m,
            verify=data.verify,
            **extra,
        )

    return batches


def _steps_per_epoch(config, spec: StepSpec, local_batch: int, process_count: int) -> int:
    from mtl_sparse_jax.data import pipeline

    steps = pipeline.steps_per_epoch(
        config.data.dir, "train", local_batch, train=True, process_count=process_count, data_format=config.data.format
    )
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    if steps == 0:
        raise config_utils.ConfigError(
            f"the train split of {config.data.dir} has fewer examples than batch_size={config.batch_size}; lower it"
        )
    return steps


def run_trial(spec: StepSpec, config, trial_dir: str, trial: int, image_size, batches: Batches | None = None) -> dict:
    """Trains one trial (resuming if possible), then evaluates the test split. Returns the test metrics."""
    os.makedirs(trial_dir, exist_ok=True)
    seed = config.seed + trial
    batches = batches or shard_batches(config, spec, seed)
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(trial_dir, "checkpoints"))
    jsonl = report.JsonlWriter(os.path.join(trial_dir, "metrics.jsonl"))
    process_count = jax.process_count()
    local_batch = config.batch_size // process_count
    eval_batch = eval_batch_size(config, spec.num_devices, process_count)
    steps = _steps_per_epoch(config, spec, local_batch, process_count)

    # ---- restore or init
    history: list[dict] = []
    es = EarlyStopper(config.early_stopping.patience)
    task_es = {t: EarlyStopper(config.early_stopping.task_patience) for t in spec.task_names}
    start_epoch = 0
    if ckpts.latest_epoch("latest") is not None:
        state, meta = ckpts.restore_newest_readable("latest", state_lib.abstract_train_state(spec, image_size))
        history = meta["history"]
        es = EarlyStopper(**meta["early_stopping"])
        task_es = {t: EarlyStopper(**v) for t, v in meta["task_early_stopping"].items()}
        start_epoch = meta["epoch"] + 1
        # The config may change lr or lam between runs; the restored optimizer state takes the config's values.
        state = state_lib.set_hyperparams(spec, state, learning_rate=config.optimizer.lr, lam=config.sparsity.lam)
        jsonl.rewrite(history)
        print(f"trial {trial}: resumed from epoch {meta['epoch']} ({trial_dir})", flush=True)
    else:
        state = state_lib.create_train_state(
            spec, image_size, seed, learning_rate=config.optimizer.lr, lam=config.sparsity.lam
        )
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
            state = state_lib.reset_optimizer(spec, state)
        train_stats = step_lib.init_train_stats_on_mesh(spec)
        bar = report.progress(
            steps, desc=f"trial {trial} epoch {epoch}", enabled=config.log.progress and report.is_writer()
        )
        t0 = t1 = time.perf_counter()
        pending = None
        step_it = iter(evaluate_lib.prefetch(spec, batches("train", True, epoch, local_batch)))
        for i in range(steps):
            batch = next(step_it)
            state, step_losses, train_stats = step_lib.train_step(spec, state, batch, rng, train_stats)
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
        hp = state_lib.hyperparams(state)
        sp = sparsity_summary(spec, state.params)
        common = {
            "trial": trial,
            "epoch": epoch,
            "lam": hp["lam"],
            "lr": hp["learning_rate"],
            "sparsity/group": float(sp["group_sparsity"]),
            "sparsity/param": float(sp["param_sparsity"]),
        }
        ts = jax.device_get(train_stats)
        n = max(float(ts["_loss"]["count"]), 1.0)
        train_rec = {
            **common,
            "split": "train",
            "loss/total": float(ts["_loss"]["total"]) / n,
            **{f"loss/{t}": float(ts["_loss"][t]) / n for t in spec.task_names},
            "images_per_sec": images_per_sec,
        }
        if spec.train_metrics:
            for task in spec.tasks:
                values = task.finalize(ts[task.name])
                values.pop(f"{task.name}/loss")
                train_rec.update({k: float(v) for k, v in values.items()})
        val = evaluate_lib.evaluate(
            spec, state_lib.eval_variables(state), batches("val", False, epoch, eval_batch), seed=seed
        )
        val_rec = {**common, "split": "val", **val, "images_per_sec": images_per_sec}
        bar.set_postfix_str(report.postfix(val_rec, spec.task_map))
        bar.close()

        # ---- early stopping and best checkpoints
        best_state = state_lib.eval_variables(state)
        if es.update(val["loss/total"], epoch):
            ckpts.save("best", epoch, best_state, {"epoch": epoch, "val": val_rec})
        for t in spec.task_names:
            if task_es[t].stopped:
                continue
            if task_es[t].update(val[f"loss/{t}"], epoch):
                ckpts.save(f"best_{t}", epoch, best_state, {"epoch": epoch, "val": val_rec})
            if task_es[t].stopped and len(spec.task_names) > 1:
                stopped = jax.device_put(jnp.zeros((), jnp.float32), spec.replicated)
                state = state.replace(task_active={**state.task_active, t: stopped})
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
    test = evaluate_trial(spec, config, trial_dir, trial, image_size, batches=batches, ckpts=ckpts, history=history)
    ckpts.close()
    return test


def evaluate_trial(
    spec: StepSpec, config, trial_dir: str, trial: int, image_size, *, batches=None, ckpts=None, history=None
) -> dict:
    """Restores the selected checkpoint(s) of a trial and evaluates the test split; writes test_metrics.json."""
    own = ckpts is None
    ckpts = ckpts or ckpt_lib.TrialCheckpoints(os.path.join(trial_dir, "checkpoints"))
    seed = config.seed + trial
    batches = batches or shard_batches(config, spec, seed)
    eval_batch = eval_batch_size(config, spec.num_devices, jax.process_count())
    abstract_best = state_lib.eval_variables(state_lib.abstract_train_state(spec, image_size))

    def run(name):
        best, meta = ckpts.restore(name, abstract_best)
        metrics = evaluate_lib.evaluate(
            spec, best, batches("test", False, 0, eval_batch), train_mode=config.eval.train_mode, seed=seed
        )
        return best, meta, metrics

    best, meta, metrics = run("best")
    result = {"trial": trial, "checkpoint": "best", "epoch": meta["epoch"], **metrics}
    if config.eval.checkpoint == "per_task" and len(spec.task_names) > 1:
        # As the reference's main_multi_trials: each task's numbers from the weights at its own best epoch.
        for t in spec.task_names:
            if not ckpts.exists(f"best_{t}"):
                continue
            _, meta_t, metrics_t = run(f"best_{t}")
            for k, v in metrics_t.items():
                if k.startswith(f"{t}/") or k == f"loss/{t}":
                    result[k] = v
            result[f"epoch/{t}"] = meta_t["epoch"]
        result["checkpoint"] = "per_task"
    sp = sparsity_summary(spec, best["params"])
    result["sparsity/group"] = float(sp["group_sparsity"])
    result["sparsity/param"] = float(sp["param_sparsity"])
    result["sparsity/zero_output_filters"] = int(sp["zero_output_filters"])
    result["eval_mode"] = "train (reference compat)" if config.eval.train_mode else "eval"
    report.write_json(os.path.join(trial_dir, "test_metrics.json"), result)
    jsonl_path = os.path.join(trial_dir, "metrics.jsonl")
    if history is None and os.path.exists(jsonl_path):
        history = report.read_jsonl(jsonl_path)
    report.plot_sparsity_layers(
        sp["per_layer"],
        os.path.join(trial_dir, "sparsity_layers.png"),
        title=f"{', '.join(spec.task_names)} — group sparsity {sp['group_sparsity']:.1f}% (trial {trial})",
    )
    if history:
        report.plot_sparsity_curve(history, os.path.join(trial_dir, "sparsity_curve.png"))
    if own:
        ckpts.close()
    return result


def load_data_manifest(config) -> dict:
    """The dataset's manifest, checked as `data.verify` says (one-line DataError when missing or corrupt); for
    data.format='tfds' the same facts (image size, features, splits) read from the tfds metadata."""
    from mtl_sparse_jax.data import spec as data_spec

    if config.data.format == "tfds":
        from mtl_sparse_jax.data import tfds_source

        return tfds_source.describe(config.data.dir, config.data.features)
    manifest = data_spec.load_manifest(config.data.dir, verify=config.data.verify)
    data_spec.features_for_tasks(manifest, config.tasks, config.data.dir)  # a task the data lacks: now, not later
    return manifest


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> list[dict]:
    """Runs every trial in `workdir` (resuming), writes results.csv / results.md; returns the test metrics."""
    config_utils.validate(config)
    manifest = load_data_manifest(config)
    spec = step_spec(config, devices=devices)
    config_utils.record_workdir_config(config, workdir, write=report.is_writer())
    os.makedirs(workdir, exist_ok=True)
    image_size = tuple(manifest["image_size"])
    results = []
    for trial in range(config.num_trials):
        trial_dir = os.path.join(workdir, f"trial_{trial}")
        done_path = os.path.join(trial_dir, "test_metrics.json")
        if os.path.exists(done_path):
            with open(done_path) as f:
                results.append(json.load(f))
            print(f"trial {trial}: already finished ({done_path})", flush=True)
            continue
        results.append(run_trial(spec, config, trial_dir, trial, image_size))
    report.write_results(workdir, results, spec.task_map)
    return results


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> list[dict]:
    """Restores every trained trial in `workdir` and evaluates its test split, on whatever devices are present."""
    config_utils.validate(config)
    manifest = load_data_manifest(config)
    spec = step_spec(config, devices=devices)
    image_size = tuple(manifest["image_size"])
    results = []
    for trial in range(config.num_trials):
        trial_dir = os.path.join(workdir, f"trial_{trial}")
        if not os.path.isdir(os.path.join(trial_dir, "checkpoints", "best")):
            continue
        results.append(evaluate_trial(spec, config, trial_dir, trial, image_size))
    if not results:
        raise FileNotFoundError(
            f"no trained trial with a best checkpoint under {workdir}; train first with --mode train"
        )
    report.write_results(workdir, results, spec.task_map)
    return results
