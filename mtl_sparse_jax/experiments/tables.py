"""The sweep report's numbers: `summary.json` (mean and population std per cell) and the paper's Table 1 layout.

Every number comes from the cells' `trial_<k>/test_metrics.json`. A cell with fewer finished trials than its
config asks for is reported with the trials it has and marked "incomplete" (never ranked); a cell with none is
listed as "not run".

Table layout (`tables/table.md` / `.csv`, as the paper's Table 1): rows are task set × λ (× prox kind when the
sweep has several), single-task sets first; columns are each task's paper metric, % group sparsity, % parameters
at zero and Δm (%) against the single-task cells at λ = 0 (`metrics.delta_m`). In every column the best value
is **bold** and the second best <u>underlined</u>. `tables/metrics.md` / `.csv` has every standard metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Sequence

from mtl_sparse_jax import metrics as metrics_lib
from mtl_sparse_jax import tasks as tasks_lib
from mtl_sparse_jax.experiments import sweep as sweep_lib

SPARSITY_COLUMNS = ("sparsity/group", "sparsity/param")
_NOT_METRICS = ("trial", "epoch")


# ----------------------------------------------------------------------------------------------------------------
# summary.json


def read_trials(workdir: str, cell: sweep_lib.Cell) -> list[dict]:
    out = []
    for k in range(cell.config.num_trials):
        path = os.path.join(sweep_lib.cell_dir(workdir, cell), f"trial_{k}", "test_metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0), as the paper's tables and `report.mean_std`."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)


def summarize(sweep: sweep_lib.Sweep, workdir: str) -> dict:
    cells = []
    for cell in sweep.cells:
        trials = read_trials(workdir, cell)
        keys: list[str] = []
        for t in trials:
            for k, v in t.items():
                if (
                    k in _NOT_METRICS
                    or k.startswith("epoch/")
                    or isinstance(v, bool)
                    or not isinstance(v, (int, float))
                ):
                    continue
                if k not in keys:
                    keys.append(k)
        values = {}
        for k in keys:
            xs = [float(t[k]) for t in trials if k in t]
            m, s = mean_std(xs)
            values[k] = {"mean": m, "std": s, "n": len(xs)}
        cells.append(
            {
                "index": cell.index,
                "name": cell.name,
                "overrides": sweep_lib._jsonable(cell.overrides),
                "tasks": list(cell.tasks),
                "lam": cell.lam,
                "prox": cell.prox,
                "num_trials": int(cell.config.num_trials),
                "trials_done": len(trials),
                "complete": len(trials) == cell.config.num_trials,
                "metrics": values,
            }
        )
    return {
        "sweep_file": sweep.path,
        "base_overrides": sweep_lib._jsonable(sweep.base_overrides),
        "dataset": sweep.base.dataset,
        "cells": cells,
    }


# ----------------------------------------------------------------------------------------------------------------
# Columns, baselines and Δm


def task_order(summary: dict) -> list[str]:
    order: list[str] = []
    for c in summary["cells"]:
        for t in c["tasks"]:
            if t not in order:
                order.append(t)
    return order


def paper_columns(summary: dict) -> list[str]:
    """Each task's paper metric: the paper's table columns for NYU-v2 / CelebA (synthetic follows NYU-v2)."""
    dataset = summary["dataset"]
    candidates = tasks_lib.PAPER_TABLE_COLUMNS.get(dataset, tasks_lib.PAPER_TABLE_COLUMNS["nyu"])
    present = task_order(summary)
    cols = [c for c in candidates if c.split("/")[0] in present]
    covered = {c.split("/")[0] for c in cols}
    cols += [tasks_lib.main_metric(t) for t in present if t not in covered]
    return cols


def standard_columns(summary: dict) -> list[str]:
    """Every task metric found in the cells, task by task, in the order the tasks report them."""
    present = task_order(summary)
    cols: list[str] = []
    for t in present:
        for c in summary["cells"]:
            for k in c["metrics"]:
                if k.split("/")[0] == t and k not in cols:
                    cols.append(k)
    return cols


def directions(columns: Sequence[str]) -> dict[str, bool]:
    out = {}
    for col in columns:
        if col in SPARSITY_COLUMNS:
            out[col] = True
            continue
        try:
            out.update(tasks_lib.higher_is_better([col]))
        except ValueError:
            pass  # a metric without a declared direction is shown, not ranked
    return out


def _other_overrides(cell: dict) -> str:
    rest = {k: v for k, v in cell["overrides"].items() if k not in ("tasks", "sparsity.lam", "sparsity.prox", "_name")}
    return json.dumps(rest, sort_keys=True)


def baseline_for(summary: dict, cell: dict, task: str) -> dict | None:
    """The single-task cell of `task` at λ = 0 with trials: the one sharing the cell's other overrides if any."""
    candidates = [c for c in summary["cells"] if c["tasks"] == [task] and c["lam"] == 0.0 and c["trials_done"] > 0]
    same = [c for c in candidates if _other_overrides(c) == _other_overrides(cell)]
    chosen = same or candidates
    return chosen[0] if chosen else None


def delta_m(summary: dict, cell: dict, columns: Sequence[str]) -> float | None:
    """Δm (%) of `cell` against the single-task λ = 0 cells of its tasks, over its tasks' paper metrics."""
    if cell["trials_done"] == 0:
        return None
    if len(cell["tasks"]) == 1 and cell["lam"] == 0.0:
        return None  # a baseline itself
    mtl, stl = {}, {}
    for col in columns:
        task = col.split("/")[0]
        if task not in cell["tasks"] or col not in cell["metrics"]:
            continue
        base = baseline_for(summary, cell, task)
        if base is None or col not in base["metrics"]:
            return None
        mtl[col] = cell["metrics"][col]["mean"]
        stl[col] = base["metrics"][col]["mean"]
    if not mtl:
        return None
    return metrics_lib.delta_m(mtl, stl, directions(list(mtl)))


# ----------------------------------------------------------------------------------------------------------------
# Tables


def ordered_cells(summary: dict) -> list[dict]:
    """Single-task sets first, task sets in order of first appearance, then prox kind, other overrides and λ."""
    sets: list[tuple] = []
    for c in summary["cells"]:
        if tuple(c["tasks"]) not in sets:
            sets.append(tuple(c["tasks"]))
    return sorted(
        summary["cells"],
        key=lambda c: (len(c["tasks"]) > 1, sets.index(tuple(c["tasks"])), c["prox"], _other_overrides(c), c["lam"]),
    )


def ranks(rows: Sequence[dict], columns: Sequence[str], higher: dict[str, bool]) -> dict[tuple[int, str], str]:
    """{(row index, column): 'best' | 'second'} over complete rows, by mean; ties share the rank."""
    out = {}
    for col in columns:
        if col not in higher:
            continue
        vals = [(i, r["values"][col]) for i, r in enumerate(rows) if r["complete"] and r["values"].get(col) is not None]
        distinct = sorted({v for _, v in vals}, reverse=higher[col])
        for i, v in vals:
            if distinct and v == distinct[0]:
                out[(i, col)] = "best"
            elif len(distinct) > 1 and v == distinct[1]:
                out[(i, col)] = "second"
    return out


def build_table(summary: dict, metric_columns: Sequence[str], *, with_delta: bool) -> dict:
    """Rows (task set, λ, prox, trials, mean/std per column) and the ranking marks of one table."""
    columns = list(metric_columns) + list(SPARSITY_COLUMNS)
    proxes = {c["prox"] for c in summary["cells"]}
    rows = []
    for c in ordered_cells(summary):
        values = {col: c["metrics"][col]["mean"] if col in c["metrics"] else None for col in columns}
        stds = {col: c["metrics"][col]["std"] if col in c["metrics"] else None for col in columns}
        if with_delta:
            values["delta_m"] = delta_m(summary, c, metric_columns)
            stds["delta_m"] = None
        rows.append(
            {
                "name": c["name"],
                "tasks": "+".join(c["tasks"]),
                "lam": c["lam"],
                "prox": sweep_lib.PROX_NAMES.get(c["prox"], c["prox"]),
                "trials": f"{c['trials_done']}/{c['num_trials']}",
                "complete": c["complete"],
                "trials_done": c["trials_done"],
                "values": values,
                "stds": stds,
            }
        )
    all_columns = columns + (["delta_m"] if with_delta else [])
    higher = directions(columns)
    if with_delta:
        higher["delta_m"] = True
    return {
        "columns": all_columns,
        "rows": rows,
        "marks": ranks(rows, all_columns, higher),
        "show_prox": len(proxes) > 1,
    }


def _fmt(col: str, value: float | None, std: float | None) -> str:
    if value is None:
        return "—"
    if col == "delta_m":
        return f"{value:+.2f}"
    digits = 1 if col in SPARSITY_COLUMNS else 4
    text = f"{value:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


HEADERS = {"sparsity/group": "% group sparsity", "sparsity/param": "% params at zero", "delta_m": "Δm (%)"}


def table_markdown(table: dict, title: str) -> str:
    cols = table["columns"]
    head = ["tasks", "λ"] + (["prox"] if table["show_prox"] else []) + ["trials"]
    head += [HEADERS.get(c, f"`{c}`") for c in cols]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(table["rows"]):
        trials = r["trials"] if r["complete"] else (f"{r['trials']} incomplete" if r["trials_done"] else "not run")
        cells = [r["tasks"], sweep_lib.format_value(r["lam"])] + ([r["prox"]] if table["show_prox"] else [])
        cells.append(trials)
        for c in cols:
            text = _fmt(c, r["values"].get(c), r["stds"].get(c))
            mark = table["marks"].get((i, c))
            if mark == "best":
                text = f"**{text}**"
            elif mark == "second":
                text = f"<u>{text}</u>"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± population std over trials, test split. **Bold**: best, <u>underlined</u>: second best in the column "
        "(complete cells only). Δm: against the single-task cells at λ = 0, over each task's column above.",
    ]
    return "\n".join(lines) + "\n"


def table_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["cell", "tasks", "lam", "prox", "trials_done", "complete"]
    for c in table["columns"]:
        head += [f"{c}_mean", f"{c}_std", f"{c}_mark"]
    w.writerow(head)
    for i, r in enumerate(table["rows"]):
        row = [r["name"], r["tasks"], repr(r["lam"]), r["prox"], r["trials_done"], r["complete"]]
        for c in table["columns"]:
            v, s = r["values"].get(c), r["stds"].get(c)
            row += ["" if v is None else repr(v), "" if s is None else repr(s), table["marks"].get((i, c), "")]
        w.writerow(row)
    return buf.getvalue()


def write_tables(summary: dict, workdir: str) -> list[str]:
    out_dir = os.path.join(workdir, "tables")
    written = []
    paper = build_table(summary, paper_columns(summary), with_delta=True)
    full = build_table(summary, standard_columns(summary), with_delta=False)
    title = f"Sweep {os.path.basename(summary['sweep_file'])} ({summary['dataset']})"
    for stem, table, t in (("table", paper, title), ("metrics", full, title + ": every standard metric")):
        sweep_lib.write_text_atomic(os.path.join(out_dir, f"{stem}.md"), table_markdown(table, t))
        sweep_lib.write_text_atomic(os.path.join(out_dir, f"{stem}.csv"), table_csv(table))
        written += [os.path.join(out_dir, f"{stem}.md"), os.path.join(out_dir, f"{stem}.csv")]
    return written
