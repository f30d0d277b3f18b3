"""The sweep report's figures (the paper's Figs. 3 and 4), in `WORKDIR/figures/`.

A *series* is the cells that differ only in λ (same task set, prox kind and other overrides); every series with
at least two values of λ is drawn. λ axes are symmetric-log, linear below the smallest positive λ, so that the
dense cell (λ = 0) sits at the left edge.

* `lambda_metrics.png` (Fig. 4a): each paper metric against λ, mean ± std over trials;
* `lambda_sparsity.png` (Fig. 4b): % group sparsity and % parameters at zero against λ;
* `sparsity_profile.png` (Fig. 4c): validation group sparsity per epoch, one line per λ (mean over trials);
* `layers_<cell>.png` (Fig. 3): active against total input channels of every backbone conv, at the best
  checkpoint of the first finished trial, for each multi-task cell with λ > 0 next to the single-task cells of
  its tasks at the same λ; the counts are also in `layers_<cell>.json`;
* `lambda_latency.png` (Fig. 4d): backbone latency (batch 1, float32), dense-with-zeros and compact, against λ,
  timed by `mtl_sparse_jax.benchmark` on the best checkpoint of each cell of the longest series.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from mtl_sparse_jax import lomt
from mtl_sparse_jax.experiments import sweep as sweep_lib
from mtl_sparse_jax.experiments import tables

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, path)


def series(summary: dict) -> list[dict]:
    """Groups of cells with trials that differ only in λ, at least two λ; longest first (multi-task first on a tie)."""
    groups: dict[tuple, list[dict]] = {}
    for c in summary["cells"]:
        if c["trials_done"] == 0:
            continue
        key = (tuple(c["tasks"]), c["prox"], tables._other_overrides(c))
        groups.setdefault(key, []).append(c)
    out = []
    for (task_set, prox, other), cells in groups.items():
        cells = sorted(cells, key=lambda c: c["lam"])
        if len({c["lam"] for c in cells}) < 2:
            continue
        label = "+".join(task_set) + ("" if prox == "adaptive" else f" ({sweep_lib.PROX_NAMES.get(prox, prox)})")
        if other != "{}":
            label += f" {other}"
        out.append({"label": label, "tasks": task_set, "prox": prox, "cells": cells})
    out.sort(key=lambda s: (-len(s["cells"]), -len(s["tasks"])))
    return out


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _lam_axis(ax, lams: Sequence[float]) -> None:
    positive = [x for x in lams if x > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
    ax.set_xlabel("λ")
    ax.grid(alpha=0.3)


def _points(cells: Sequence[dict], key: str):
    xs, ms, ss = [], [], []
    for c in cells:
        if key in c["metrics"]:
            xs.append(c["lam"])
            ms.append(c["metrics"][key]["mean"])
            ss.append(c["metrics"][key]["std"])
    return np.array(xs), np.array(ms), np.array(ss)


def plot_lambda_metrics(summary: dict, path: str) -> bool:
    all_series = series(summary)
    cols = tables.paper_columns(summary)
    if not all_series:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False)
    lams = [c["lam"] for s in all_series for c in s["cells"]]
    for ax, col in zip(axes[0], cols):
        for i, s in enumerate(all_series):
            x, m, sd = _points(s["cells"], col)
            if len(x):
                ax.errorbar(x, m, yerr=sd, marker="o", ms=4, capsize=3, color=COLORS[i % len(COLORS)], label=s["label"])
        _lam_axis(ax, lams)
        better = tables.directions([col]).get(col)
        ax.set_title(f"{col} ({'higher' if better else 'lower'} is better)", fontsize=9)
    _legend(axes[0][0])
    fig.suptitle("Test metrics against λ (mean ± std over trials)", fontsize=10)
    _save(fig, path)
    return True


def plot_lambda_sparsity(summary: dict, path: str) -> bool:
    all_series = series(summary)
    if not all_series:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    lams = [c["lam"] for s in all_series for c in s["cells"]]
    for ax, col, title in zip(
        axes[0], tables.SPARSITY_COLUMNS, ("% group sparsity (zero input channels)", "% parameters at zero")
    ):
        for i, s in enumerate(all_series):
            x, m, sd = _points(s["cells"], col)
            if len(x):
                ax.errorbar(x, m, yerr=sd, marker="o", ms=4, capsize=3, color=COLORS[i % len(COLORS)], label=s["label"])
        _lam_axis(ax, lams)
        ax.set_ylim(-2, 102)
        ax.set_title(title, fontsize=9)
    _legend(axes[0][0])
    _save(fig, path)
    return True


def _val_profile(workdir: str, cell_name: str, num_trials: int) -> tuple[np.ndarray, np.ndarray] | None:
    per_trial = []
    for k in range(num_trials):
        path = os.path.join(workdir, cell_name, f"trial_{k}", "metrics.jsonl")
        if not os.path.exists(os.path.join(workdir, cell_name, f"trial_{k}", "test_metrics.json")):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        per_trial.append({r["epoch"]: r["sparsity/group"] for r in rows if r.get("split") == "val"})
    if not per_trial:
        return None
    epochs = sorted(set.intersection(*(set(p) for p in per_trial)))  # early-stopped trials end earlier
    return np.array(epochs), np.array([np.mean([p[e] for p in per_trial]) for e in epochs])


def plot_sparsity_profile(summary: dict, workdir: str, path: str) -> bool:
    all_series = series(summary)[:4]
    if not all_series:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(all_series), figsize=(5 * len(all_series), 3.6), squeeze=False)
    for ax, s in zip(axes[0], all_series):
        for i, c in enumerate(s["cells"]):
            prof = _val_profile(workdir, c["name"], c["num_trials"])
            if prof is None:
                continue
            ax.plot(prof[0], prof[1], marker=".", color=COLORS[i % len(COLORS)], label=f"λ={c['lam']:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("% group sparsity (validation, mean over trials)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(s["label"], fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Per-layer channels (Fig. 3)


def layer_counts(cell: sweep_lib.Cell, workdir: str) -> list[tuple[str, int, int]] | None:
    """[(conv path, active input channels, total), ...] in forward order, from the best checkpoint of the first
    finished trial; None when no trial finished. Restored with orbax as saved (no model or trainer needed)."""
    from mtl_sparse_jax import checkpoint as ckpt_lib
    from mtl_sparse_jax import models

    for k in range(cell.config.num_trials):
        trial_dir = os.path.join(sweep_lib.cell_dir(workdir, cell), f"trial_{k}")
        if not os.path.exists(os.path.join(trial_dir, "test_metrics.json")):
            continue
        ckpts = ckpt_lib.TrialCheckpoints(os.path.join(trial_dir, "checkpoints"))
        try:
            state, _ = ckpts.restore("best", None)
        finally:
            ckpts.close()
        backbone = state["params"]["backbone"]
        out = []
        for path in models.conv_paths(cell.config.model.depth):
            node = backbone
            for part in path.split("/"):
                node = node.get(part, {})
            if "kernel" not in node:
                continue  # a backbone truncated at the heads' taps (LOMT) ends earlier
            kernel = np.asarray(node["kernel"])  # HWIO; a group is one input channel
            active = int(np.sum(np.any(kernel != 0, axis=(0, 1, 3))))
            out.append((path, active, int(kernel.shape[2])))
        return out
    return None


def plot_layers(panels: Sequence[tuple[str, list]], path: str) -> None:
    plt = _pyplot()
    n = len(panels)
    names = [p for p, _, _ in panels[0][1]]
    fig, axes = plt.subplots(1, n, figsize=(max(6, 0.16 * len(names)) * n, 4.2), squeeze=False, sharey=True)
    for ax, (title, counts) in zip(axes[0], panels):
        x = np.arange(len(counts))
        total = np.array([t for _, _, t in counts])
        active = np.array([a for _, a, _ in counts])
        ax.bar(x, total, color="#c6d3ea", label="total input channels")
        ax.bar(x, active, color="#c44e52", label="active input channels")
        ax.set_xticks(x)
        ax.set_xticklabels([p for p, _, _ in counts], rotation=90, fontsize=5)
        pct = 100.0 * (1 - active.sum() / max(total.sum(), 1))
        ax.set_title(f"{title}: {pct:.1f}% of channels removed", fontsize=9)
    axes[0][0].set_ylabel("input channels per conv")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def plot_all_layers(sweep: sweep_lib.Sweep, summary: dict, workdir: str, out_dir: str) -> list[str]:
    by_name = {c.name: c for c in sweep.cells}
    written = []
    for s in summary["cells"]:
        if len(s["tasks"]) < 2 or s["lam"] == 0.0 or s["trials_done"] == 0:
            continue
        partners = [
            c
            for c in summary["cells"]
            if len(c["tasks"]) == 1
            and c["tasks"][0] in s["tasks"]
            and c["lam"] == s["lam"]
            and c["prox"] == s["prox"]
            and tables._other_overrides(c) == tables._other_overrides(s)
            and c["trials_done"] > 0
        ]
        panels = []
        for c in [*partners, s]:
            counts = layer_counts(by_name[c["name"]], workdir)
            if counts is not None:
                panels.append(("+".join(c["tasks"]) + f", λ={c['lam']:g}", counts))
        if not panels:
            continue
        png = os.path.join(out_dir, f"layers_{s['name']}.png")
        plot_layers(panels, png)
        sweep_lib.write_json_atomic(
            os.path.join(out_dir, f"layers_{s['name']}.json"),
            {title: [list(x) for x in counts] for title, counts in panels},
        )
        written.append(png)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Latency (Fig. 4d)


def bench_cell(cell: sweep_lib.Cell, workdir: str, repeats: int) -> dict | None:
    """Backbone latency (batch 1, float32) of the cell's best checkpoint: {'dense_ms', 'compact_ms'}.

    Reuses `WORKDIR/<cell>/bench/bench.json` when it is newer than the cell's finished trials."""
    d = sweep_lib.cell_dir(workdir, cell)
    done = sweep_lib.trials_done(workdir, cell)
    if not done:
        return None
    bench_json = os.path.join(d, "bench", "bench.json")
    newest = max(os.path.getmtime(os.path.join(d, f"trial_{k}", "test_metrics.json")) for k in done)
    if os.path.exists(bench_json) and os.path.getmtime(bench_json) >= newest:
        with open(bench_json) as f:
            result = json.load(f)
    else:
        from mtl_sparse_jax import benchmark

        result = benchmark.run_from_workdir(
            cell.config, d, out_dir=os.path.dirname(bench_json), batch_sizes=(1,), dtypes=("float32",), repeats=repeats
        )
    rows = {r["model"]: r for r in result["results"] if r["variant"] == "backbone" and r["batch_size"] == 1}
    return {"dense_ms": rows["dense"]["latency_ms_median"], "compact_ms": rows["compact"]["latency_ms_median"]}


def plot_lambda_latency(sweep: sweep_lib.Sweep, summary: dict, workdir: str, path: str, repeats: int = 10) -> bool:
    all_series = series(summary)
    if not all_series:
        return False
    main = all_series[0]
    by_name = {c.name: c for c in sweep.cells}
    points = []
    for c in main["cells"]:
        timing = bench_cell(by_name[c["name"]], workdir, repeats)
        if timing is not None:
            points.append((c["lam"], timing["dense_ms"], timing["compact_ms"]))
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    lam, dense, compact = (np.array(v) for v in zip(*points))
    ax.plot(lam, dense, marker="o", color=COLORS[0], label="dense with zeros")
    ax.plot(lam, compact, marker="o", color=COLORS[3], label="compact (channels removed)")
    _lam_axis(ax, list(lam))
    ax.set_ylabel("backbone latency, ms (batch 1, fp32, median)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{main['label']}: backbone latency against λ", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def write_figures(sweep: sweep_lib.Sweep, summary: dict, workdir: str, *, bench: bool = True, repeats: int = 10):
    out_dir = os.path.join(workdir, "figures")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, ok in (
        ("lambda_metrics.png", lambda p: plot_lambda_metrics(summary, p)),
        ("lambda_sparsity.png", lambda p: plot_lambda_sparsity(summary, p)),
        ("sparsity_profile.png", lambda p: plot_sparsity_profile(summary, workdir, p)),
    ):
        if ok(os.path.join(out_dir, name)):
            written.append(os.path.join(out_dir, name))
    written += plot_all_layers(sweep, summary, workdir, out_dir)
    if bench and plot_lambda_latency(sweep, summary, workdir, os.path.join(out_dir, "lambda_latency.png"), repeats):
        written.append(os.path.join(out_dir, "lambda_latency.png"))
    return written


def write_report(sweep: sweep_lib.Sweep, workdir: str, *, bench: bool = True, repeats: int = 10, log=print) -> dict:
    """summary.json, tables/ and figures/ of a sweep from what its cells wrote so far."""
    summary = tables.summarize(sweep, workdir)
    sweep_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    written = [os.path.join(workdir, "summary.json")]
    written += tables.write_tables(summary, workdir)
    written += write_figures(sweep, summary, workdir, bench=bench, repeats=repeats)
    written += lomt.write_comparison(sweep, summary, workdir, bench=bench, repeats=repeats)
    for p in written:
        log(f"wrote {p}")
    return summary
