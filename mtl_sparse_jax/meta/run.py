"""Meta-sparsity runs: meta-training (episodes, checkpoints, logs) and meta-test on tasks unseen in meta-training.

`meta_train(config, workdir)` writes `<workdir>/meta_train/`: `metrics.jsonl` (one train and one val record per
epoch, with `lam`), `meta.jsonl` (one record per episode: subset, λ, query loss, dF/dρ), `lambda_trajectory.png`,
`sparsity_layers.png`, `summary.json`, and orbax checkpoints. Run again on the same workdir, it resumes from the
last finished epoch; episodes (subsets, batches, dropout keys) are functions of (seed, epoch, episode), so a
resumed run ends where an uninterrupted one does.

`meta_test(config, workdir)` puts a new head for each `meta.test_tasks` task on three backbones (the meta-trained
one, an ordinary sparse MTL run's, and a random one), fine-tunes each for `meta.test_steps` steps on
`meta.test_fraction` of the train split and writes `<workdir>/meta_test/`: `curves.jsonl`,
`meta_test_curves.png`, `meta_test.json`, `meta_test.md`.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time

import jax
import numpy as np

from mtl_sparse_jax import checkpoint as ckpt_lib
from mtl_sparse_jax import config_utils, report
from mtl_sparse_jax import tasks as tasks_lib
from mtl_sparse_jax.meta import core
from mtl_sparse_jax.training import evaluation as evaluate_lib
from mtl_sparse_jax.training import loop as loop_lib
from mtl_sparse_jax.training import state as state_lib
from mtl_sparse_jax.training import step as step_lib
from mtl_sparse_jax.training.spec import step_spec

QUERY_SPLITS = ("val", "train")


def validate_meta(config, manifest: dict | None = None) -> None:
    """One-line ConfigErrors for the meta.* fields (and, given the data manifest, for meta.test_tasks)."""
    m = config.meta
    n = len(config.tasks)
    if int(m.inner_steps) < 1:
        raise config_utils.ConfigError(f"config key 'meta.inner_steps' must be >= 1, got {m.inner_steps}")
    if not 1 <= int(m.min_tasks) <= n:
        raise config_utils.ConfigError(
            f"config key 'meta.min_tasks'={m.min_tasks} must be between 1 and the {n} meta-training tasks {list(config.tasks)}"
        )
    if not float(m.lam_init) > 0:
        raise config_utils.ConfigError(f"config key 'meta.lam_init' must be > 0 (λ = exp(ρ)), got {m.lam_init}")
    choices = {
        "meta.inner_optimizer": (m.inner_optimizer, core.INNER_OPTIMIZERS),
        "meta.order": (m.order, core.ORDERS),
        "meta.query_split": (m.query_split, QUERY_SPLITS),
        "meta.finetune": (m.finetune, ("all", "head")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise config_utils.ConfigError(f"config key '{key}' is {value!r}; choose one of {list(allowed)}")
    for key in ("inner_lr", "lam_lr"):
        if not float(m[key]) > 0:
            raise config_utils.ConfigError(f"config key 'meta.{key}' must be > 0, got {m[key]}")
    for key in ("outer_every", "test_steps", "test_eval_every"):
        if int(m[key]) < 1:
            raise config_utils.ConfigError(f"config key 'meta.{key}' must be >= 1, got {m[key]}")
    if m.query_split == "train" and not 0 < float(m.query_fraction) < 1:
        raise config_utils.ConfigError(
            f"config key 'meta.query_fraction' (the part of train held out as the query set) must be in (0, 1), "
            f"got {m.query_fraction}"
        )
    if not 0 < float(m.test_fraction) <= 1:
        raise config_utils.ConfigError(f"config key 'meta.test_fraction' must be in (0, 1], got {m.test_fraction}")
    if config.sparsity.prox == "none" or config.optimizer.name != "prox_adamw":
        raise config_utils.ConfigError(
            "meta-sparsity needs the proximal optimizer: set optimizer.name='prox_adamw' and sparsity.prox to "
            "'adaptive' or 'euclidean'"
        )
    for t in m.test_tasks:
        if t not in tasks_lib.task_names():
            raise config_utils.ConfigError(
                f"unknown task '{t}' in config key 'meta.test_tasks'; known tasks: {list(tasks_lib.task_names())}"
            )
        if t in config.tasks:
            raise config_utils.ConfigError(
                f"meta.test_tasks entry '{t}' is also a meta-training task in 'tasks'; an unseen task must not be"
            )
    if manifest is not None:
        from mtl_sparse_jax.data import spec as data_spec

        have = data_spec.available_tasks(manifest["features"])
        for t in m.test_tasks:
            if t not in have:
                raise config_utils.ConfigError(
                    f"meta.test_tasks entry '{t}' is not in the data at {config.data.dir} (it has {have}); "
                    f"remove it or point data.dir at a dataset with it"
                )


def _prepare(config):
    config_utils.validate(config)
    validate_meta(config)
    manifest = loop_lib.load_data_manifest(config)
    validate_meta(config, manifest)
    return manifest


def _steps(config, split: str) -> int:
    from mtl_sparse_jax.data import pipeline

    local = config.batch_size // jax.process_count()
    steps = pipeline.steps_per_epoch(config.data.dir, split, local, train=True, process_count=jax.process_count())
    if split == "train" and config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    if steps == 0:
        raise config_utils.ConfigError(
            f"the {split} split of {config.data.dir} has fewer examples than batch_size={config.batch_size}; lower it"
        )
    return steps


def _query_batches(batches, split: str, epoch: int, batch_size: int):
    """Shuffled query batches for one epoch, cycling over as many passes of the split as needed."""
    for k in range(10_000):
        yield from batches(split, True, epoch * 10_000 + k, batch_size)


def held_out_train(config, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(support, query) for `meta.query_split='train'`: the train split's examples (padding dropped), split by a
    permutation that depends on `seed` alone into a query part of round(meta.query_fraction · n) examples and a
    support part of the rest. The parts are disjoint by construction and the same on every run (so a resumed run
    uses the same split); the real val split stays free for early stopping and model selection. Both carry the
    examples' 'id'. The train split is held in host memory."""
    arrays = _load_arrays(config, "train", tuple(config.tasks), seed, with_ids=True)
    n = len(arrays["weight"])
    n_query = int(round(float(config.meta.query_fraction) * n))
    if min(n_query, n - n_query) < config.batch_size:
        raise config_utils.ConfigError(
            f"meta.query_fraction={config.meta.query_fraction} splits the {n} train examples into {n - n_query} "
            f"support and {n_query} query examples; each part needs at least batch_size={config.batch_size}"
        )
    order = np.random.default_rng([seed, 0x51E7]).permutation(n)
    query, support = np.sort(order[:n_query]), np.sort(order[n_query:])
    return {k: v[support] for k, v in arrays.items()}, {k: v[query] for k, v in arrays.items()}


def _shuffled_batches(arrays, batch_size: int, seed: int, epoch: int, salt: int):
    """This process's part of global batches of `batch_size` from `arrays`, reshuffled every pass by
    (seed, epoch, salt, pass) only, for as many passes as the consumer takes; 'id' is dropped."""
    n = len(arrays["weight"])
    local = batch_size // jax.process_count()
    lo = jax.process_index() * local
    for k in range(1_000_000):
        order = np.random.default_rng([seed, epoch, salt, k]).permutation(n)
        for i in range(n // batch_size):
            idx = order[i * batch_size + lo : i * batch_size + lo + local]
            yield {key: v[idx] for key, v in arrays.items() if key != "id"}


def episode_sources(config, batches, seed: int):
    """(episodes per epoch, support(epoch), query(epoch)): the support and query batch iterators of an epoch.

    `meta.query_split='val'`: support = the shuffled train split, query = shuffled val batches. 'train': both come
    from `held_out_train` (support from its support part, query from its query part). Either way an epoch's
    batches are a function of (seed, epoch) only."""
    local_batch = config.batch_size // jax.process_count()
    if config.meta.query_split == "val":
        steps = _steps(config, "train")
        _steps(config, "val")
        return (
            steps,
            lambda epoch: batches("train", True, epoch, local_batch),
            lambda epoch: _query_batches(batches, "val", epoch, local_batch),
        )
    support, query = held_out_train(config, seed)
    steps = len(support["weight"]) // config.batch_size
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    return (
        steps,
        lambda epoch: _shuffled_batches(support, config.batch_size, seed, epoch, 0x5077),
        lambda epoch: _shuffled_batches(query, config.batch_size, seed, epoch, 0x9E7),
    )


def abstract_meta_state(mspec: core.MetaSpec, spec, image_size):
    ts = state_lib.abstract_train_state(spec, image_size)
    shapes = jax.eval_shape(lambda t: core.init_meta_state(mspec, t, 1.0), ts)
    return ckpt_lib.abstract_like(shapes, spec.replicated)


def meta_train(config, workdir: str) -> dict:
    """Meta-trains (resuming), writes <workdir>/meta_train/; returns the summary (final λ, sparsity, val)."""
    manifest = _prepare(config)
    spec = step_spec(config)
    mspec = core.meta_spec(config, spec)
    image_size = tuple(manifest["image_size"])
    out = os.path.join(workdir, "meta_train")
    os.makedirs(out, exist_ok=True)
    if report.is_writer():
        config_utils.save(config, os.path.join(workdir, "config.json"))
    seed = config.seed
    batches = loop_lib.shard_batches(config, spec, seed)
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(out, "checkpoints"))
    metrics = report.JsonlWriter(os.path.join(out, "metrics.jsonl"))
    episodes_log = report.JsonlWriter(os.path.join(out, "meta.jsonl"))
    eval_batch = loop_lib.eval_batch_size(config, spec.num_devices, jax.process_count())
    steps, support_batches, query_batches = episode_sources(config, batches, seed)

    history, episodes, start_epoch = [], [], 0
    if ckpts.latest_epoch("latest") is not None:
        mstate, meta = ckpts.restore("latest", abstract_meta_state(mspec, spec, image_size))
        history, episodes, start_epoch = meta["history"], meta["episodes"], meta["epoch"] + 1
        mstate = mstate.replace(train=state_lib.set_hyperparams(spec, mstate.train, learning_rate=config.optimizer.lr))
        print(f"meta-train: resumed from epoch {meta['epoch']} ({out})", flush=True)
    else:
        ts = state_lib.create_train_state(
            spec, image_size, seed, learning_rate=config.optimizer.lr, lam=config.meta.lam_init
        )
        mstate = jax.device_put(core.init_meta_state(mspec, ts, config.meta.lam_init), spec.replicated)
    metrics.rewrite(history)
    episodes_log.rewrite(episodes)

    base_rng = jax.random.PRNGKey(seed + 20_000)
    every = int(config.meta.outer_every)
    for epoch in range(start_epoch, config.num_epochs):
        subsets = core.draw_subsets(spec.task_names, config.meta.min_tasks, seed, epoch, steps)
        support_it = iter(evaluate_lib.prefetch(spec, support_batches(epoch)))
        query_it = iter(evaluate_lib.prefetch(spec, query_batches(epoch)))
        bar = report.progress(steps, desc=f"meta epoch {epoch}", enabled=config.log.progress)
        t0 = time.perf_counter()
        epoch_logs = []
        for i in range(steps):
            index = epoch * steps + i
            apply_update = (i + 1) % every == 0 or i == steps - 1
            lam = core.lam_of(mstate)
            mstate, log = core.meta_step(
                mspec,
                apply_update,
                mstate,
                next(support_it),
                next(query_it),
                core.task_mask(spec.task_names, subsets[i]),
                jax.random.fold_in(base_rng, index),
            )
            log = {k: float(v) for k, v in jax.device_get(log).items()}
            if not all(math.isfinite(v) for v in log.values()):
                raise loop_lib.NonFiniteLossError(
                    f"non-finite meta-step values at episode {index} (epoch {epoch}, tasks {list(subsets[i])}): "
                    f"{log}; lower --config.meta.inner_lr or --config.meta.lam_lr"
                )
            epoch_logs.append({"epoch": epoch, "episode": index, "tasks": list(subsets[i]), "lam": lam, **log})
            bar.update(1)
        bar.close()
        jax.block_until_ready(mstate)
        seconds = time.perf_counter() - t0
        lam = core.lam_of(mstate)
        sp = loop_lib.sparsity_summary(spec, mstate.train.params)
        common = {
            "epoch": epoch,
            "lam": lam,
            "rho": float(np.log(lam)),
            "sparsity/group": float(sp["group_sparsity"]),
            "sparsity/param": float(sp["param_sparsity"]),
        }
        train_rec = {
            **common,
            "split": "train",
            "loss/query": float(np.mean([e["query_loss"] for e in epoch_logs])),
            "loss/support": float(np.mean([e["support_loss"] for e in epoch_logs])),
            "episodes_per_sec": steps / seconds,
        }
        val = evaluate_lib.evaluate(
            spec, state_lib.eval_variables(mstate.train), batches("val", False, epoch, eval_batch), seed=seed
        )
        val_rec = {**common, "split": "val", **val}
        print(
            f"meta epoch {epoch}: λ={lam:.3g} group sparsity {common['sparsity/group']:.1f}% "
            f"query loss {train_rec['loss/query']:.4f} val total {val['loss/total']:.4f} ({seconds:.0f} s)",
            flush=True,
        )
        history.extend([train_rec, val_rec])
        episodes.extend(epoch_logs)
        ckpts.save("latest", epoch, mstate, {"epoch": epoch, "history": history, "episodes": episodes})
        metrics.append([train_rec, val_rec])
        episodes_log.append(epoch_logs)
    ckpts.close()

    sp = loop_lib.sparsity_summary(spec, mstate.train.params)
    final_val = next((r for r in reversed(history) if r["split"] == "val"), {})
    summary = {
        "lam_init": float(config.meta.lam_init),
        "lam_final": core.lam_of(mstate),
        "episodes": len(episodes),
        "sparsity/group": float(sp["group_sparsity"]),
        "sparsity/param": float(sp["param_sparsity"]),
        "val": {k: v for k, v in final_val.items() if k.startswith(("loss/", *spec.task_names))},
    }
    report.write_json(os.path.join(out, "summary.json"), summary)
    plot_lambda_trajectory(episodes, history, os.path.join(out, "lambda_trajectory.png"))
    report.plot_sparsity_layers(
        sp["per_layer"],
        os.path.join(out, "sparsity_layers.png"),
        title=f"meta-trained backbone — λ={summary['lam_final']:.3g}, group sparsity {sp['group_sparsity']:.1f}%",
    )
    return summary


def plot_lambda_trajectory(episodes: list[dict], history: list[dict], path: str) -> None:
    """λ per episode (log scale) and the backbone's group sparsity per epoch."""
    if not report.is_writer() or not episodes:
        return
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.semilogy([e["episode"] for e in episodes], [e["lam"] for e in episodes], color="C0", label="λ (per episode)")
    ax.set_xlabel("episode")
    ax.set_ylabel("λ", color="C0")
    val = [r for r in history if r["split"] == "val"]
    if val:
        steps_per_epoch = len(episodes) / max(len(val), 1)
        ax2 = ax.twinx()
        ax2.plot(
            [(r["epoch"] + 1) * steps_per_epoch for r in val],
            [r["sparsity/group"] for r in val],
            "o-",
            color="C1",
            label="group sparsity",
        )
        ax2.set_ylabel("group sparsity (%)", color="C1")
    ax.set_title("meta-sparsity: learned λ")
    fig.tight_layout()
    report.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Meta-test


def _single_task_config(config, task: str):
    c = copy.deepcopy(config)
    c.tasks = (task,)
    c.meta.test_tasks = ()
    return c


def _load_arrays(config, split: str, tasks, seed: int, with_ids: bool = False) -> dict[str, np.ndarray]:
    """A whole split for `tasks` in file order, padding dropped, as numpy arrays."""
    from mtl_sparse_jax.data import pipeline

    parts = list(
        pipeline.iterate_batches(
            config.data.dir,
            split,
            tasks=tasks,
            batch_size=64,
            train=False,
            seed=seed,
            depth_norm=config.data.depth_norm,
            depth_max_m=config.data.depth_max_m,
            verify=config.data.verify,
            with_ids=with_ids,
        )
    )
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = arrays["weight"] > 0
    return {k: v[keep] for k, v in arrays.items()}


def _train_arrays(config, task: str, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The first `fraction` of the train split (file order) for `task`, as numpy arrays."""
    arrays = _load_arrays(config, "train", (task,), seed)
    n = max(int(round(fraction * len(arrays["weight"]))), 1)
    if n < config.batch_size:
        raise config_utils.ConfigError(
            f"meta.test_fraction={fraction} leaves {n} train examples, fewer than batch_size={config.batch_size}; "
            f"raise meta.test_fraction"
        )
    return {k: v[:n] for k, v in arrays.items()}


def _array_batches(arrays, batch_size: int, seed: int):
    n = len(arrays["weight"])
    for epoch in range(1_000_000):
        order = np.random.default_rng([seed, epoch, 0x7E57]).permutation(n)
        for i in range(n // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield {k: v[idx] for k, v in arrays.items()}


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _finetune_step(spec, head_only: bool, state, batch, rng):
    new, losses = step_lib.update(spec, state, batch, rng)
    if head_only:  # the backbone (weights and BN statistics) stays as it was
        new = new.replace(
            params={**new.params, "backbone": state.params["backbone"]},
            batch_stats={**new.batch_stats, "backbone": state.batch_stats["backbone"]},
        )
    return new, losses


def _restore_backbone(config, workdir: str):
    """(params, batch_stats, λ) of the meta-trained model in workdir/meta_train."""
    spec = step_spec(config)
    mspec = core.meta_spec(config, spec)
    manifest = loop_lib.load_data_manifest(config)
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(workdir, "meta_train", "checkpoints"))
    if ckpts.latest_epoch("latest") is None:
        raise FileNotFoundError(f"no meta-trained checkpoint under {workdir}/meta_train; run --mode meta_train first")
    mstate, _ = ckpts.restore("latest", abstract_meta_state(mspec, spec, tuple(manifest["image_size"])))
    ckpts.close()
    return mstate.train.params, mstate.train.batch_stats, core.lam_of(mstate)


def _baseline_backbone(config, workdir: str):
    """(params, batch_stats, λ) of an ordinary sparse MTL run on the same tasks (trained here if not given)."""
    base_dir = config.meta.baseline_workdir or os.path.join(workdir, "mtl_baseline")
    c = copy.deepcopy(config)
    c.meta.enabled = False
    c.meta.test_tasks = ()
    c.num_trials = 1
    if not config.meta.baseline_workdir:
        loop_lib.train_and_evaluate(c, base_dir)
    spec = step_spec(c)
    manifest = loop_lib.load_data_manifest(c)
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(base_dir, "trial_0", "checkpoints"))
    state, _ = ckpts.restore("latest", state_lib.abstract_train_state(spec, tuple(manifest["image_size"])))
    ckpts.close()
    return state.params, state.batch_stats, float(c.sparsity.lam)


def meta_test(config, workdir: str) -> list[dict]:
    """Fine-tunes new heads for the unseen tasks on three backbones; writes <workdir>/meta_test/."""
    manifest = _prepare(config)
    if not config.meta.test_tasks:
        raise config_utils.ConfigError("meta.test_tasks is empty; name the unseen tasks, e.g. \"('edge',)\"")
    image_size = tuple(manifest["image_size"])
    out = os.path.join(workdir, "meta_test")
    os.makedirs(out, exist_ok=True)
    meta_bb = _restore_backbone(config, workdir)
    mtl_bb = _baseline_backbone(config, workdir)
    lam = meta_bb[2]
    m = config.meta
    rows, curves = [], []
    for task in m.test_tasks:
        cu = _single_task_config(config, task)
        spec = step_spec(cu)
        seed = config.seed
        arrays = _train_arrays(cu, task, float(m.test_fraction), seed)
        batches = loop_lib.shard_batches(cu, spec, seed)
        eval_batch = loop_lib.eval_batch_size(cu, spec.num_devices, jax.process_count())
        inits = {"meta-sparsity backbone": meta_bb, "sparse MTL backbone": mtl_bb, "from scratch": None}
        for init, source in inits.items():
            state = state_lib.create_train_state(spec, image_size, seed + 1, learning_rate=cu.optimizer.lr, lam=lam)
            if source is not None:
                state = state.replace(
                    params={**state.params, "backbone": source[0]["backbone"]},
                    batch_stats={**state.batch_stats, "backbone": source[1]["backbone"]},
                )
            head_only = m.finetune == "head" and source is not None
            it = _array_batches(arrays, cu.batch_size, seed)
            rng = jax.random.PRNGKey(seed + 30_000)
            for step in range(1, int(m.test_steps) + 1):
                state, _ = _finetune_step(spec, head_only, state, evaluate_lib.put_batch(spec, next(it)), rng)
                if step % int(m.test_eval_every) == 0 or step == int(m.test_steps):
                    val = evaluate_lib.evaluate(
                        spec, state_lib.eval_variables(state), batches("val", False, 0, eval_batch), seed=seed
                    )
                    curves.append({"task": task, "init": init, "step": step, **val})
            test = evaluate_lib.evaluate(
                spec, state_lib.eval_variables(state), batches("test", False, 0, eval_batch), seed=seed
            )
            sp = loop_lib.sparsity_summary(spec, state.params)
            rows.append(
                {
                    "task": task,
                    "init": init,
                    "finetune": "head" if head_only else "all",
                    "steps": int(m.test_steps),
                    "source_lam": None if source is None else source[2],
                    **test,
                    "sparsity/group": float(sp["group_sparsity"]),
                }
            )
            shown = {k: v for k, v in test.items() if k.startswith(f"{task}/") or k == f"loss/{task}"}
            print(f"meta-test {task} [{init}]: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)
    report.JsonlWriter(os.path.join(out, "curves.jsonl")).rewrite(curves)
    report.write_json(os.path.join(out, "meta_test.json"), rows)
    write_meta_test_table(rows, os.path.join(out, "meta_test.md"))
    plot_meta_test_curves(curves, os.path.join(out, "meta_test_curves.png"))
    return rows


def write_meta_test_table(rows: list[dict], path: str) -> None:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metrics = sorted({k for r in rows if r["task"] == task for k in r if k.startswith(f"{task}/")})
        header = ["init", "fine-tuned", "steps", "backbone λ", *metrics, f"loss/{task}", "group sparsity %"]
        lines += [f"**{task}** (unseen task, test split)", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for r in (r for r in rows if r["task"] == task):
            lam = "—" if r["source_lam"] is None else f"{r['source_lam']:.3g}"
            vals = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in metrics]
            cells = [r["init"], r["finetune"], str(r["steps"]), lam, *vals, f"{r[f'loss/{task}']:.4f}"]
            cells.append(f"{r['sparsity/group']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    report._write_text(path, "\n".join(lines) + "\n")


def plot_meta_test_curves(curves: list[dict], path: str) -> None:
    if not report.is_writer() or not curves:
        return
    plt = report._pyplot()
    tasks = list(dict.fromkeys(c["task"] for c in curves))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for init in dict.fromkeys(c["init"] for c in curves if c["task"] == task):
            pts = [c for c in curves if c["task"] == task and c["init"] == init]
            ax.plot([c["step"] for c in pts], [c[f"loss/{task}"] for c in pts], "o-", label=init)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(f"val loss/{task}")
        ax.set_title(f"unseen task: {task}")
        ax.legend()
    fig.tight_layout()
    report.save_figure(fig, path)


def meta_train_and_test(config, workdir: str) -> None:
    meta_train(config, workdir)
    if config.meta.test_tasks:
        meta_test(config, workdir)
