"""Sweeps: a base config and a list of cells (dicts of config overrides), each run as an ordinary training run.

A sweep file `configs/sweeps/<name>.py` defines `get_sweep()` returning `(base_config, cells)`; `cells` is a list
of dicts such as `{'tasks': ('seg', 'depth'), 'sparsity.lam': 1e-5}`, usually built with :func:`grid`,
:func:`product` and :func:`union`. Cell `k` runs in `WORKDIR/<name_k>/` with the same outputs as
`python -m mtl_sparse_jax.main`; the names are readable and stable (`seg+depth__lam1e-05__group`), so a rerun
finds its cells again even when cells are added to the file.

The state of a cell is read from its directory: 'done' (every trial wrote `test_metrics.json`), 'partial'
(something was written: a rerun resumes from the checkpoints) or 'new'; a cell whose last run raised is
'failed', recorded in `WORKDIR/<cell>/sweep_cell.json`. `WORKDIR/sweep.json` is rebuilt from these files after
every cell, so processes running different cells at once (a SLURM array) never lose each other's records.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from mtl_sparse_jax import config_utils

CELL_RECORD = "sweep_cell.json"
NAME_KEY = "_name"  # a cell may name itself; every other key is a config override
PROX_NAMES = {"adaptive": "group", "euclidean": "group-euclidean", "l1": "l1", "none": "noprox"}


class SweepError(ValueError):
    """A sweep file, cell, override or option is wrong; the message names it and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Building cell lists


def grid(**axes: Sequence) -> list[dict]:
    """The product of the given axes: `grid(tasks=[('seg',), ('depth',)], lam=[0, 1e-5])` with dotted keys passed
    as `grid(**{'sparsity.lam': [0, 1e-5]})`. The last axis varies fastest."""
    keys = list(axes)
    for k, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise SweepError(f"grid axis '{k}' must be a list of values, got {values!r}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(axes[k]) for k in keys))]


def product(*cell_lists: Sequence[Mapping]) -> list[dict]:
    """Every combination of one cell from each list, merged (later lists win on a shared key)."""
    out = []
    for combo in itertools.product(*cell_lists):
        merged: dict = {}
        for cell in combo:
            merged.update(cell)
        out.append(merged)
    return out


def union(*cell_lists: Sequence[Mapping]) -> list[dict]:
    """The cells of all lists in order, each distinct set of overrides once."""
    out, seen = [], set()
    for cells in cell_lists:
        for cell in cells:
            key = json.dumps(_jsonable(dict(cell)), sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(dict(cell))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Cells and the sweep


@dataclasses.dataclass
class Cell:
    index: int
    name: str
    overrides: dict  # as written in the sweep file (plus nothing): what distinguishes this cell
    config: ml_collections.ConfigDict  # the resolved config it runs

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config.tasks)

    @property
    def lam(self) -> float:
        return float(self.config.sparsity.lam)

    @property
    def prox(self) -> str:
        return str(self.config.sparsity.prox)


@dataclasses.dataclass
class Sweep:
    path: str
    base: ml_collections.ConfigDict
    base_overrides: dict  # from --override.KEY=VALUE
    cells: list[Cell]

    def select(self, only: str | None = None, cell: int | None = None) -> list[Cell]:
        """The cells named by `--cell K` (an index) or `--only PATTERN` (a glob or a substring of the name)."""
        if cell is not None:
            if not 0 <= cell < len(self.cells):
                raise SweepError(
                    f"--cell {cell} is out of range: {self.path} has {len(self.cells)} cells (0..{len(self.cells) - 1})"
                    f"; list them with --dry-run"
                )
            chosen = [self.cells[cell]]
        else:
            chosen = list(self.cells)
        if only:
            chosen = [c for c in chosen if fnmatch.fnmatchcase(c.name, only) or only in c.name]
            if not chosen:
                raise SweepError(f"--only {only!r} matches no cell of {self.path}; list the names with --dry-run")
        return chosen


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return x


def format_value(v) -> str:
    """A value as it appears in a cell name: 1e-05, 0.001, 0, seg+depth, True."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "+".join(format_value(x) for x in v)
    return str(v)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=_-]", "-", text)


def cell_name(config: ml_collections.ConfigDict, overrides: Mapping) -> str:
    """`<tasks>__lam<λ>__<prox>` from the resolved config, then `__<key>=<value>` for every other override."""
    parts = [
        "+".join(config.tasks),
        f"lam{format_value(float(config.sparsity.lam))}",
        PROX_NAMES.get(config.sparsity.prox, config.sparsity.prox),
    ]
    for key in sorted(overrides):
        if key in ("tasks", "sparsity.lam", "sparsity.prox", NAME_KEY):
            continue
        parts.append(f"{key}={format_value(overrides[key])}")
    return _safe("__".join(parts))


def _set(config: ml_collections.ConfigDict, key: str, value, where: str) -> None:
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise SweepError(f"{where} sets unknown config key '{key}' ('{'.'.join(parents[: i + 1])}' is no section)")
        node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        import difflib

        known = config_utils._flat_keys(config)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see configs/default.py for every key"
        raise SweepError(f"{where} sets unknown config key '{key}'{hint}")
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, (list, tuple)):
        value = tuple(value)
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where} sets '{key}' to {value!r}, but it holds {type(old).__name__} values ({e})") from None


def parse_override_value(text: str):
    """`--override.x=y`: a Python literal when it parses as one (1e-5, 3, True, ('seg','depth')), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_sweep(path: str, base_overrides: Mapping | None = None) -> Sweep:
    """Loads and checks a sweep file: every cell's overrides exist, every cell validates, names are unique."""
    base_overrides = dict(base_overrides or {})
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} does not exist; pass e.g. --sweep configs/sweeps/demo.py")
    module_name = "_sweep_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SweepError(f"{path} is not a Python file; a sweep file is a .py file defining get_sweep()")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in user code becomes one line naming the file
        raise SweepError(f"{path} failed to import: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(); it must return (base_config, cells), see configs/sweeps/")
    try:
        result = module.get_sweep()
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"{path}: get_sweep() raised {type(e).__name__}: {e}") from None
    if isinstance(result, Mapping):
        base, cells = result.get("base"), result.get("cells")
    elif isinstance(result, tuple) and len(result) == 2:
        base, cells = result
    else:
        raise SweepError(f"{path}: get_sweep() must return (base_config, cells), got {type(result).__name__}")
    if not isinstance(base, ml_collections.ConfigDict):
        raise SweepError(
            f"{path}: get_sweep()'s base config is a {type(base).__name__}, not an ml_collections ConfigDict"
        )
    if not cells:
        raise SweepError(f"{path}: get_sweep() returned no cells; return at least one dict of overrides ({{}} = base)")

    base = ml_collections.ConfigDict(base.to_dict())  # our own copy; unlocked
    for key, value in base_overrides.items():
        _set(base, key, value, f"--override.{key}")
    try:
        config_utils.validate(base)
    except config_utils.ConfigError as e:
        raise SweepError(f"{path}: base config: {e}") from None

    out, names = [], {}
    for i, overrides in enumerate(cells):
        if not isinstance(overrides, Mapping):
            raise SweepError(f"{path}: cell {i} is a {type(overrides).__name__}, not a dict of overrides")
        overrides = dict(overrides)
        where = f"{path}: cell {i} {_describe(overrides)}"
        config = ml_collections.ConfigDict(base.to_dict())
        for key, value in overrides.items():
            if key == NAME_KEY:
                continue
            _set(config, key, value, where)
        try:
            config_utils.validate(config)
        except config_utils.ConfigError as e:
            raise SweepError(f"{where}: {e}") from None
        name = _safe(str(overrides[NAME_KEY])) if NAME_KEY in overrides else cell_name(config, overrides)
        if name in names:
            raise SweepError(
                f"{path}: cells {names[name]} and {i} have the same name '{name}'; make their overrides differ "
                f"or give one a '{NAME_KEY}'"
            )
        names[name] = i
        config.lock()
        out.append(Cell(index=i, name=name, overrides=overrides, config=config))
    return Sweep(path=path, base=base, base_overrides=base_overrides, cells=out)


def _describe(overrides: Mapping) -> str:
    return json.dumps(_jsonable({k: v for k, v in overrides.items()}), sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------
# State on disk


def write_json_atomic(path: str, obj: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def cell_dir(workdir: str, cell: Cell) -> str:
    return os.path.join(workdir, cell.name)


def trials_done(workdir: str, cell: Cell) -> list[int]:
    d = cell_dir(workdir, cell)
    return [
        k for k in range(cell.config.num_trials) if os.path.exists(os.path.join(d, f"trial_{k}", "test_metrics.json"))
    ]


def cell_state(workdir: str, cell: Cell) -> dict:
    """{'state': 'done' | 'partial' | 'new' | 'failed', 'trials_done', 'num_trials'[, 'error']}."""
    d = cell_dir(workdir, cell)
    done = trials_done(workdir, cell)
    record = {}
    record_path = os.path.join(d, CELL_RECORD)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    out = {"trials_done": len(done), "num_trials": int(cell.config.num_trials)}
    if len(done) == cell.config.num_trials:
        out["state"] = "done"
    elif record.get("state") == "failed":
        out["state"] = "failed"
        out["error"] = record.get("error", "")
    elif os.path.isdir(d) and any(n.startswith("trial_") for n in os.listdir(d)):
        out["state"] = "partial"
    else:
        out["state"] = "new"
    return out


def write_sweep_json(sweep: Sweep, workdir: str) -> dict:
    """WORKDIR/sweep.json: the sweep file, the base overrides and every cell's overrides and state."""
    cells = []
    for c in sweep.cells:
        cells.append(
            {
                "index": c.index,
                "name": c.name,
                "overrides": _jsonable(c.overrides),
                "tasks": list(c.tasks),
                "lam": c.lam,
                "prox": c.prox,
                **cell_state(workdir, c),
            }
        )
    obj = {
        "sweep_file": os.path.abspath(sweep.path),
        "base_overrides": _jsonable(sweep.base_overrides),
        "num_cells": len(cells),
        "cells": cells,
    }
    write_json_atomic(os.path.join(workdir, "sweep.json"), obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Running


LOCK = "sweep_cell.lock"


def _acquire(d: str) -> str | None:
    """Takes the cell's lock; returns the owner ('host:pid') when a live process on this host holds it.

    Two processes of one sweep (e.g. two --only selections, or a resubmitted array task) then never train the
    same cell at once. A lock left by a killed process (its pid is gone) is taken over; a lock from another
    host is trusted, since its process cannot be checked from here (delete the file if that job is dead).
    """
    import socket

    path = os.path.join(d, LOCK)
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = f.read().strip()
            except FileNotFoundError:
                continue
            host, _, pid = owner.rpartition(":")
            if host != socket.gethostname():
                return owner
            try:
                os.kill(int(pid), 0)
                return owner
            except (ProcessLookupError, ValueError):
                os.remove(path)  # stale: its process is gone
                continue
            except PermissionError:
                return owner
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return None
    return "unknown"


def _release(d: str) -> None:
    try:
        os.remove(os.path.join(d, LOCK))
    except FileNotFoundError:
        pass


def _print(line: str) -> None:
    print(line, flush=True)


def run_cells(sweep: Sweep, workdir: str, cells: Sequence[Cell], *, log=_print) -> list[Cell]:
    """Runs every unfinished cell of `cells` one after another in this process; returns the cells that failed.

    A cell's run is `training.train_and_evaluate(config, WORKDIR/<cell>)`, which resumes its trials from their
    checkpoints; the trainer keeps compiled steps between cells whose shapes match (lr and λ are injected
    hyperparameters), so a λ grid compiles once per task set.
    """
    from mtl_sparse_jax import training

    os.makedirs(workdir, exist_ok=True)
    failed = []
    for cell in cells:
        state = cell_state(workdir, cell)
        if state["state"] == "done":
            log(f"[{cell.index}] {cell.name}: done ({state['trials_done']}/{state['num_trials']} trials), skipped")
            continue
        d = cell_dir(workdir, cell)
        os.makedirs(d, exist_ok=True)
        owner = _acquire(d)
        if owner is not None:
            log(f"[{cell.index}] {cell.name}: running in another process ({owner}), skipped")
            continue
        verb = {"partial": "resuming", "failed": "retrying"}.get(state["state"], "starting")
        log(f"[{cell.index}] {cell.name}: {verb}")
        t0 = time.time()
        try:
            training.train_and_evaluate(cell.config, d)
        except Exception as e:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            write_json_atomic(
                os.path.join(d, CELL_RECORD),
                {"state": "failed", "error": message, "traceback": traceback.format_exc()},
            )
            log(f"[{cell.index}] {cell.name}: FAILED: {message}")
            failed.append(cell)
        else:
            write_json_atomic(os.path.join(d, CELL_RECORD), {"state": "done", "seconds": round(time.time() - t0, 1)})
            log(f"[{cell.index}] {cell.name}: done in {time.time() - t0:.0f} s")
        finally:
            _release(d)
        write_sweep_json(sweep, workdir)
    write_sweep_json(sweep, workdir)
    return failed


def dry_run_lines(sweep: Sweep, workdir: str, cells: Sequence[Cell]) -> list[str]:
    lines = [f"{sweep.path}: {len(sweep.cells)} cells, {len(cells)} selected, workdir {workdir}"]
    width = max(len(c.name) for c in cells)
    for c in cells:
        s = cell_state(workdir, c)
        extra = f"  {s['error']}" if s.get("error") else ""
        lines.append(
            f"{c.index:4d}  {c.name:<{width}}  {s['state']:<7}  {s['trials_done']}/{s['num_trials']} trials{extra}"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------------
# SLURM


def slurm_script(
    sweep: Sweep,
    workdir: str,
    cells: Sequence[Cell],
    *,
    partition: str | None = None,
    gpus_per_task: int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    time_limit: str | None = None,
    max_parallel: int | None = None,
    sbatch_args: Sequence[str] = (),
    python: str | None = None,
    cwd: str | None = None,
) -> str:
    """A job array with one task per selected cell; task K runs `python -m mtl_sparse_jax.sweep ... --cell K`."""
    workdir = os.path.abspath(workdir)
    indices = ",".join(str(c.index) for c in cells)
    array = indices + (f"%{max_parallel}" if max_parallel else "")
    name = _safe(os.path.splitext(os.path.basename(sweep.path))[0])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sweep_{name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={workdir}/slurm/%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    for arg in sbatch_args:
        lines.append(f"#SBATCH {arg}")
    command = [python or sys.executable, "-m", "mtl_sparse_jax.sweep", "--sweep", os.path.abspath(sweep.path)]
    command += ["--workdir", workdir]
    for key, value in sweep.base_overrides.items():
        command.append(f"--override.{key}={value!r}" if not isinstance(value, str) else f"--override.{key}={value}")
    lines += [
        "# One array task per cell; after all of them: python -m mtl_sparse_jax.sweep --sweep ... --report",
        "set -euo pipefail",
        f"cd {shlex.quote(os.path.abspath(cwd or os.getcwd()))}",
        f'exec {" ".join(shlex.quote(a) for a in command)} --cell "$SLURM_ARRAY_TASK_ID"',
        "",
    ]
    return "\n".join(lines)
