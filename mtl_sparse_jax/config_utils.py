"""Config checks with one-line errors, and saving/loading the resolved config as JSON."""

from __future__ import annotations

import difflib
import json
import os

import ml_collections

from mtl_sparse_jax import fileio


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix."""


_CHOICES = {
    "dataset": ("nyu", "celeba", "synthetic"),
    "optimizer.name": ("prox_adamw", "adam_l2"),
    "sparsity.prox": ("adaptive", "euclidean", "l1", "none"),
    "loss.combiner": ("uncertainty", "uncertainty_reference", "sum", "fixed"),
    "loss_resolution": ("feature", "input"),
    "eval.checkpoint": ("best", "per_task"),
    "data.depth_norm": ("reference", "fixed", "none"),
    "data.verify": ("size", "sha256", "none"),
    "data.format": ("shards", "tfds"),
    "data.loader": ("tfdata", "device"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.depth": (18, 50, 101),
    "model.output_stride": (8, 16, 32),
    "model.tap_point": ("conv", "bn", "relu"),
}


# (key, lower check, upper check, what is allowed): checked by validate() before anything is written.
_RANGES = (
    ("num_epochs", lambda v: v >= 1, None, ">= 1 (epochs to train)"),
    ("steps_per_epoch", lambda v: v >= 0, None, ">= 0 (0 = one pass over the train split)"),
    ("batch_size", lambda v: v >= 1, None, ">= 1 (the global train batch)"),
    ("eval_batch_size", lambda v: v >= 1, None, ">= 1"),
    ("num_trials", lambda v: v >= 1, None, ">= 1"),
    ("seed", lambda v: v >= 0, None, ">= 0"),
    ("seg_num_classes", lambda v: v >= 1, None, ">= 1"),
    ("seg_num_logits", lambda v: v >= 0, None, ">= 0 (0 = seg_num_classes)"),
    ("optimizer.lr", lambda v: v > 0, None, "> 0"),
    ("optimizer.b1", lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    ("optimizer.b2", lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    ("optimizer.eps", lambda v: v > 0, None, "> 0"),
    ("optimizer.weight_decay", lambda v: v >= 0, None, ">= 0"),
    ("sparsity.lam", lambda v: v >= 0, None, ">= 0 (0 = dense baseline)"),
    ("model.width_multiplier", lambda v: v > 0, None, "> 0"),
    ("model.head_width_multiplier", lambda v: v > 0, None, "> 0"),
    ("data.depth_max_m", lambda v: v > 0, None, "> 0 (metres)"),
    ("data.synthetic_num_train", lambda v: v >= 1, None, ">= 1"),
    ("data.synthetic_num_val", lambda v: v >= 1, None, ">= 1"),
    ("data.synthetic_num_test", lambda v: v >= 1, None, ">= 1"),
    ("data.synthetic_size", lambda v: v >= 8, None, ">= 8 (pixels)"),
    ("early_stopping.patience", lambda v: v >= 0, None, ">= 0 (0 disables)"),
    ("early_stopping.task_patience", lambda v: v >= 0, None, ">= 0 (0 disables)"),
)
_INTEGER_KEYS = {
    "num_epochs",
    "steps_per_epoch",
    "batch_size",
    "eval_batch_size",
    "num_trials",
    "seed",
    "seg_num_classes",
    "seg_num_logits",
    "data.synthetic_num_train",
    "data.synthetic_num_val",
    "data.synthetic_num_test",
    "data.synthetic_size",
    "early_stopping.patience",
    "early_stopping.task_patience",
}

# Fields that may change between runs of one workdir: the next run resumes with them and config_history.jsonl
# records the change. A change in any other field (model, tasks, data, optimizer structure, seed, batch size, ...)
# would make the checkpoints and the outputs disagree with config.json, so it is refused.
RESUMABLE_KEYS = (
    "num_epochs",
    "num_trials",
    "optimizer.lr",
    "sparsity.lam",
    "data.verify",
    "data.loader",
    "data.generate_if_missing",
    "early_stopping.patience",
    "early_stopping.task_patience",
    "eval.checkpoint",
    "eval.train_mode",
    "log.progress",
    "log.train_metrics",
)


def _flat_keys(cfg, prefix="") -> list[str]:
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            keys.extend(_flat_keys(v, path + "."))
        else:
            keys.append(path)
    return keys


def _get(cfg, path):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for an unknown key, an unknown task or choice, or an inconsistent value."""
    from mtl_sparse_jax import defaults
    from mtl_sparse_jax import tasks as tasks_lib

    known = set(_flat_keys(defaults.get_config()))
    for key in _flat_keys(config):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see mtl_sparse_jax/defaults.py for every key"
            raise ConfigError(f"unknown config key '{key}'{hint}")
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {list(choices)}")
    tasks = tuple(config.tasks)
    if not tasks:
        raise ConfigError("config key 'tasks' is empty; list at least one task, e.g. --config.tasks=\"('seg',)\"")
    for t in tasks:
        if t not in tasks_lib.task_names():
            raise ConfigError(f"unknown task '{t}' in config key 'tasks'; known tasks: {list(tasks_lib.task_names())}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"config key 'tasks' lists a task twice: {list(tasks)}")
    for key, lo, hi, why in _RANGES:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if key in _INTEGER_KEYS and int(value) != value:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if (lo is not None and not lo(value)) or (hi is not None and not hi(value)):
            raise ConfigError(f"config key '{key}' must be {why}, got {value!r}")
    if config.model.taps or config.lomt.layers_file:
        from mtl_sparse_jax import lomt

        lomt.model_taps(config)
    if config.seg_num_logits and config.seg_num_logits < config.seg_num_classes:
        raise ConfigError(
            f"seg_num_logits={config.seg_num_logits} < seg_num_classes={config.seg_num_classes}; "
            f"use 0 (= seg_num_classes) or a larger value"
        )


def to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def save(config, path: str) -> None:
    fileio.write_json(path, to_dict(config), indent=2, sort_keys=True)


def _flat_items(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for every flat key whose value differs (JSON-normalised)."""
    a, b = _flat_items(old), _flat_items(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def record_workdir_config(config, workdir: str, *, write: bool = True) -> None:
    """Checks `config` against WORKDIR/config.json before a run writes anything, then records it.

    A new workdir gets config.json. In a workdir trained before, a change to a field outside RESUMABLE_KEYS is a
    ConfigError that lists the differing keys and suggests a new workdir; resumable changes are appended to
    WORKDIR/config_history.jsonl and config.json is updated, so it always describes the latest run. Every
    process checks; only the one with `write` (process 0) writes.
    """
    import time

    path = os.path.join(workdir, "config.json")
    new = to_dict(config)
    if os.path.exists(path):
        old = read_json(path, what="the workdir's config")
        changes = config_changes(old, new)
        refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
        if refused:
            listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(refused.items())[:6])
            more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
            raise ConfigError(
                f"{path} was written by a run with other settings: {listed}{more}; its checkpoints do not fit this "
                f"config. Use a new --workdir, or rerun with the old values"
            )
        if not changes or not write:
            return
        history = os.path.join(workdir, "config_history.jsonl")
        line = json.dumps(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": {k: list(v) for k, v in changes.items()}}
        )
        with open(history, "a") as f:
            f.write(line + "\n")
    if write:
        os.makedirs(workdir, exist_ok=True)
        save(config, path)


def read_json(path: str, *, what: str = "file"):
    """json.load with a one-line ConfigError naming the file when it is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path} ({what}) is not valid JSON ({type(e).__name__}: {e}); restore it or use a new --workdir"
        ) from None


def load(path: str) -> ml_collections.ConfigDict:
    """Reads a resolved config.json back into a ConfigDict (tuples restored where the defaults have tuples)."""
    from mtl_sparse_jax import defaults

    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; pass --config FILE or train in this workdir first")
    values = read_json(path, what="a resolved config written by training")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a config object; restore it or pass --config FILE")
    config = defaults.get_config()

    def merge(cfg, d, prefix=""):
        for k, v in d.items():
            if k not in cfg:
                raise ConfigError(f"unknown config key '{prefix}{k}' in {path}; it was written by another version")
            if isinstance(cfg[k], ml_collections.ConfigDict):
                merge(cfg[k], v, f"{prefix}{k}.")
            elif isinstance(cfg[k], tuple):
                cfg[k] = tuple(v)
            else:
                cfg[k] = v

    merge(config, values)
    return config
