"""Run outputs for people and programs: progress bars, JSON and JSON lines, TensorBoard, plots, results tables.

Every writer here writes on process 0 only (`is_writer()`), through `fileio`'s atomic writes, so several
processes of one run never write the same file and a killed run never leaves a half-written one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from mtl_sparse_jax import fileio

# Sparsity columns close every results table, as the authors' CSVs do.
SPARSITY_COLUMNS = ("sparsity/group", "sparsity/param")


def is_writer() -> bool:
    """True on the process that writes a run's outputs (process 0 of a multi-process run)."""
    import jax

    return jax.process_index() == 0


def write_json(path: str, obj: Any) -> None:
    if is_writer():
        fileio.write_json(path, obj, indent=2, default=float)


def _write_text(path: str, text: str) -> None:
    if is_writer():
        fileio.write_text(path, text)


class JsonlWriter:
    """metrics.jsonl: one JSON object per line; rewritten whole on resume, appended to after each epoch."""

    def __init__(self, path: str):
        self.path = path

    def rewrite(self, records: Sequence[dict]) -> None:
        _write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, records: Sequence[dict]) -> None:
        if not is_writer():
            return
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Console


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, mininterval=1.0)


def postfix(record: dict, tasks: dict) -> str:
    """'loss 1.23 | seg/iou_paper 0.41 | ... | sparsity 35.2% | 123 img/s' for the progress bar."""
    from mtl_sparse_jax import tasks as tasks_lib

    parts = [f"val loss {record['loss/total']:.4f}"]
    for name, task in tasks.items():
        key = tasks_lib.main_metric(task)
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"sparsity {record['sparsity/group']:.1f}%")
    parts.append(f"{record['images_per_sec']:.1f} img/s")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard


class SummaryWriter:
    """TensorBoard scalars `<split>/<key>` per epoch; a no-op if TensorFlow is not installed."""

    def __init__(self, logdir: str):
        self._writer = None
        if not is_writer():
            return
        try:
            from flax.metrics import tensorboard

            self._writer = tensorboard.SummaryWriter(logdir)
        except ImportError:
            pass

    def write(self, epoch: int, records: Sequence[dict]) -> None:
        if self._writer is None:
            return
        for rec in records:
            split = rec.get("split", "test")
            for k, v in rec.items():
                if k in ("trial", "epoch", "split") or not isinstance(v, (int, float)):
                    continue
                self._writer.scalar(f"{split}/{k}", float(v), epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Writes the figure as PNG via a temp file, so a killed run never leaves a half-written plot."""
    fig.tight_layout()
    if is_writer():
        with fileio.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)


def plot_sparsity_layers(per_layer: Sequence[Sequence], path: str, title: str = "") -> None:
    """Active vs total input channels per backbone conv, in forward order (like the paper's Fig. 3)."""
    plt = _pyplot()

    names = [str(p).replace("backbone/", "").replace("/kernel", "") for p, _, _ in per_layer]
    active = np.array([a for _, a, _ in per_layer], dtype=float)
    total = np.array([t for _, _, t in per_layer], dtype=float)
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(names)), 4.5))
    x = np.arange(len(names))
    ax.bar(x, total, color="#4c72b0", label="total input channels")
    ax.bar(x, active, color="#f08a6c", label="active input channels")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("input channels (groups)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_sparsity_curve(history: Sequence[dict], path: str) -> None:
    """Group and parameter sparsity (%) per epoch."""
    plt = _pyplot()

    rows = [r for r in history if r.get("split") == "train"]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [r["sparsity/group"] for r in rows], label="group sparsity (% zero input channels)")
    ax.plot(epochs, [r["sparsity/param"] for r in rows], label="parameter sparsity (% zero weights)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Results over trials


def result_columns(results: Sequence[dict], tasks: dict) -> list[str]:
    """Per task its metrics (paper family first, as the paper's tables), then the sparsity columns."""
    cols = []
    for name, task in tasks.items():
        keys = [k for k in results[0] if k.startswith(f"{name}/")]
        paper = [k for k in task.paper_metrics if k in keys]
        cols.extend(paper + [k for k in keys if k not in paper])
    return cols + [c for c in SPARSITY_COLUMNS if c in results[0]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0), as the authors' tables."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def write_results(workdir: str, results: Sequence[dict], tasks: dict) -> None:
    """results.csv and results.md: mean ± std over trials, one row, in the paper's column layout."""
    if not results:
        return
    cols = result_columns(results, tasks)
    cells = {}
    for c in cols:
        vals = [r[c] for r in results if c in r and r[c] is not None and not math.isnan(float(r[c]))]
        if vals:
            m, s = mean_std(vals)
            cells[c] = f"{m:.4f} ± {s:.4f}"
        else:
            cells[c] = "n/a"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trials", *cols])
    writer.writerow([len(results), *[cells[c] for c in cols]])
    _write_text(os.path.join(workdir, "results.csv"), buf.getvalue())
    md = [f"Mean ± population std over {len(results)} trial(s), test split.", "", "| metric | value |", "|---|---|"] + [
        f"| `{c}` | {cells[c]} |" for c in cols
    ]
    _write_text(os.path.join(workdir, "results.md"), "\n".join(md) + "\n")
