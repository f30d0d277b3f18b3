"""Config checks with one-line errors, and saving/loading the resolved config as JSON."""

from __future__ import annotations

import difflib
import json
import os

import ml_collections


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix."""


_CHOICES = {
    "dataset": ("nyu", "celeba", "synthetic"),
    "optimizer.name": ("prox_adamw", "adam_l2"),
    "sparsity.prox": ("adaptive", "euclidean", "none"),
    "loss.combiner": ("uncertainty", "uncertainty_reference", "sum", "fixed"),
    "loss_resolution": ("feature", "input"),
    "eval.checkpoint": ("best", "per_task"),
    "data.depth_norm": ("reference", "fixed", "none"),
    "data.verify": ("size", "sha256", "none"),
    "data.loader": ("tfdata", "device"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.depth": (18, 50, 101),
    "model.output_stride": (8, 16, 32),
}


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
    from configs import default
    from mtl_sparse_jax import tasks as tasks_lib

    known = set(_flat_keys(default.get_config()))
    for key in _flat_keys(config):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see configs/default.py for every key"
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
    for key in ("batch_size", "eval_batch_size", "num_trials"):
        if _get(config, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {_get(config, key)}")
    if config.sparsity.lam < 0:
        raise ConfigError(f"config key 'sparsity.lam' must be >= 0 (0 = dense baseline), got {config.sparsity.lam}")
    if config.seg_num_logits and config.seg_num_logits < config.seg_num_classes:
        raise ConfigError(
            f"seg_num_logits={config.seg_num_logits} < seg_num_classes={config.seg_num_classes}; "
            f"use 0 (= seg_num_classes) or a larger value"
        )


def to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def save(config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load(path: str) -> ml_collections.ConfigDict:
    """Reads a resolved config.json back into a ConfigDict (tuples restored where the defaults have tuples)."""
    from configs import default

    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; pass --config FILE or train in this workdir first")
    with open(path) as f:
        values = json.load(f)
    config = default.get_config()

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
