"""LOMT ("Giving each task what it needs"): each task's head reads the backbone layer its own sparsity left active.

Phase 1 is a sweep of sparse single-task runs (`configs/sweeps/lomt_phase1_*.py`). Selection reads their best
checkpoints and writes the layers file:

  python -m mtl_sparse_jax.lomt select --phase1 runs/lomt_phase1 --out runs/lomt_phase1/lomt_layers.json

The rule (`RULE`, also written into the file):

* candidates are the block convs (conv1, conv2[, conv3] of every block) in forward order (`graph.candidate_convs`);
  stem and downsample convs are left out, as in the reference;
* a conv is active in a trial when more than ``threshold`` (default 1 %) of its input channels are active, an input
  channel i being active when the trial's best-checkpoint kernel W[:, :, i, :] has a non-zero entry;
* trials are aggregated with ``all`` (active in every trial: the reference's floor(sum / n)) or ``majority``
  (active in more than half of the trials; a tie is inactive);
* the tap is the last aggregated-active candidate: every candidate after it is inactive. When every candidate is
  inactive the task has no tap, which is an error.

Phase 2 reads the taps from ``model.taps`` ('seg=layer3_3/conv1,...') or from ``lomt.layers_file``
(`model_taps`); `training.build_model` gives them to `MultiTaskModel`, whose backbone then ends at the deepest
tap. The comparison sweep (`configs/sweeps/lomt_vs_mtl_*.py`) runs both the conventional model and the LOMT one per
task combination; its report adds `tables/lomt_vs_mtl.md` (`write_comparison`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from mtl_sparse_jax import cli, config_utils, fileio
from mtl_sparse_jax.models import graph

AGGREGATIONS = ("all", "majority")
DEFAULT_THRESHOLD = 0.01
RULE = (
    "candidates: the block convs conv1/conv2/conv3 in forward order (no stem, no downsample); a conv is active in a "
    "trial when more than threshold x C_in of its input channels have a non-zero kernel slice W[:, :, i, :] in the "
    "trial's best checkpoint; agg 'all': active in every trial, 'majority': in more than half of them (a tie is "
    "inactive); tap: the last active candidate (every later candidate is inactive)"
)
LAYERS_FILE_VERSION = 1


class LomtError(ValueError):
    """Bad LOMT input (taps, a layers file, a phase-1 directory); the message names it and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Taps of a config


def parse_taps(text: str, depth: int, tasks: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """'seg=layer3_3/conv1,depth=layer2' as ((task, tap), ...) in the order of `tasks`; ConfigError otherwise."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        task, sep, tap = (s.strip() for s in item.partition("="))
        if not sep or not task or not tap:
            raise config_utils.ConfigError(
                f"model.taps={text!r}: {item!r} is not 'task=tap'; e.g. --config.model.taps='seg=layer3_3/conv1'"
            )
        if task not in tasks:
            raise config_utils.ConfigError(
                f"model.taps names task {task!r}, which is not in the config's tasks {list(tasks)}"
            )
        if task in out:
            raise config_utils.ConfigError(f"model.taps gives task {task!r} twice")
        try:
            graph.check_taps(depth, (tap,))
        except ValueError as e:
            raise config_utils.ConfigError(f"model.taps: {e}") from None
        out[task] = tap
    return tuple((t, out[t]) for t in tasks if t in out)


def read_layers_file(path: str, depth: int, tasks: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """((task, tap), ...) for `tasks` from a layers file; ConfigError naming the file when it does not fit."""
    if not os.path.exists(path):
        raise config_utils.ConfigError(
            f"lomt.layers_file {path} does not exist; write it with python -m mtl_sparse_jax.lomt select "
            f"--phase1 PHASE1_DIR --out {path}, or set --config.lomt.layers_file"
        )
    data = config_utils.read_json(path, what="a LOMT layers file")
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise config_utils.ConfigError(f"{path} is not a LOMT layers file (no 'tasks' object); rerun lomt select")
    if data.get("depth") != depth:
        raise config_utils.ConfigError(
            f"{path} was selected on ResNetD-{data.get('depth')} runs, but the config has model.depth={depth}; "
            "select on phase-1 runs of the same depth"
        )
    missing = [t for t in tasks if t not in data["tasks"]]
    if missing:
        raise config_utils.ConfigError(
            f"{path} has taps for tasks {sorted(data['tasks'])}, not for {missing} of the config's tasks "
            f"{list(tasks)}; run phase 1 for them too, or choose tasks from the file"
        )
    taps = []
    for t in tasks:
        tap = data["tasks"][t].get("tap") if isinstance(data["tasks"][t], dict) else None
        try:
            graph.check_taps(depth, (tap,))
        except (ValueError, TypeError):
            raise config_utils.ConfigError(f"{path}: task {t!r} has tap {tap!r}, no tap of ResNetD-{depth}") from None
        taps.append((t, tap))
    return tuple(taps)


def model_taps(config) -> tuple[tuple[str, str], ...]:
    """The config's (task, tap) pairs: from lomt.layers_file, or model.taps; () for a conventional model."""
    depth, tasks = int(config.model.depth), tuple(config.tasks)
    if config.lomt.layers_file and config.model.taps:
        raise config_utils.ConfigError(
            "both model.taps and lomt.layers_file are set; set one of them (--config.model.taps='' to use the file)"
        )
    if config.lomt.layers_file:
        return read_layers_file(config.lomt.layers_file, depth, tasks)
    return parse_taps(config.model.taps, depth, tasks)


# ----------------------------------------------------------------------------------------------------------------
# Selection


def active_inputs(kernel: np.ndarray) -> int:
    """Input channels of an HWIO kernel with any non-zero entry (the group-sparsity groups that survived)."""
    return int(np.sum(np.any(np.asarray(kernel) != 0, axis=(0, 1, 3))))


def active_flags(counts: np.ndarray, totals: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """[trials, convs] booleans: more than ``threshold`` of a conv's input channels are active in that trial."""
    return np.asarray(counts, np.float64) > threshold * np.asarray(totals, np.float64)


def aggregate(flags: np.ndarray, agg: str = "all") -> np.ndarray:
    """[convs] booleans over trials: 'all' (active in every trial) or 'majority' (more than half; a tie is not)."""
    flags = np.asarray(flags, bool)
    if agg == "all":
        return flags.all(axis=0)
    if agg == "majority":
        return 2 * flags.sum(axis=0) > flags.shape[0]
    raise LomtError(f"--agg must be one of {list(AGGREGATIONS)}, got {agg!r}")


def select_index(active: Sequence[bool]) -> int | None:
    """Index of the last active candidate (every later one is inactive); None when none is active."""
    idx = np.flatnonzero(np.asarray(active, bool))
    return int(idx[-1]) if idx.size else None


def _finished_trials(run_dir: str, num_trials: int) -> list[str]:
    return [
        os.path.join(run_dir, f"trial_{k}")
        for k in range(num_trials)
        if os.path.exists(os.path.join(run_dir, f"trial_{k}", "test_metrics.json"))
    ]


def phase1_runs(phase1: str) -> dict[str, list[tuple[str, object]]]:
    """{task: [(run dir, config), ...]} of the single-task runs under `phase1` (a sweep workdir or one run)."""
    if not os.path.isdir(phase1):
        raise LomtError(f"--phase1 {phase1} is not a directory; pass the workdir of the phase-1 sweep")
    dirs = [phase1] if os.path.exists(os.path.join(phase1, "config.json")) else []
    dirs += sorted(
        os.path.join(phase1, d)
        for d in os.listdir(phase1)
        if os.path.exists(os.path.join(phase1, d, "config.json")) and os.path.join(phase1, d) not in dirs
    )
    out: dict[str, list] = {}
    for d in dirs:
        config = config_utils.load(os.path.join(d, "config.json"))
        if len(config.tasks) != 1 or not _finished_trials(d, int(config.num_trials)):
            continue
        out.setdefault(config.tasks[0], []).append((d, config))
    if not out:
        raise LomtError(
            f"{phase1} holds no finished single-task trial (RUN/trial_K/test_metrics.json); run phase 1 first: "
            "python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_phase1_demo.py --workdir " + phase1
        )
    return out


def restore_backbone(trial_dir: str, config) -> Mapping:
    """The backbone params of a trial's best checkpoint, restored onto one device whatever devices saved it."""
    import jax

    from mtl_sparse_jax import checkpoint as ckpt_lib
    from mtl_sparse_jax import training

    spec = training.step_spec(config, devices=jax.devices()[:1])
    target = training.eval_variables(training.abstract_train_state(spec, (32, 32)))
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(trial_dir, "checkpoints"))
    try:
        state, _ = ckpts.restore("best", target)
    finally:
        ckpts.close()
    return jax.device_get(state["params"]["backbone"])


def conv_counts(backbone: Mapping, depth: int) -> tuple[list[int], list[int]]:
    """(active input channels, input channels) of every candidate conv, in forward order."""
    counts, totals = [], []
    for path in graph.candidate_convs(depth):
        node = backbone
        for part in path.split("/"):
            node = node[part]
        kernel = np.asarray(node["kernel"])
        counts.append(active_inputs(kernel))
        totals.append(int(kernel.shape[2]))
    return counts, totals


def tap_shape(config, tap: str, image_size: int) -> tuple[int, tuple[int, int]]:
    """(channels, (h, w)) of a tap's value for `image_size`² images, from the model's abstract evaluation."""
    import jax
    import jax.numpy as jnp

    from mtl_sparse_jax import models

    backbone = models.ResNetD(
        depth=int(config.model.depth),
        width_multiplier=float(config.model.width_multiplier),
        output_stride=int(config.model.output_stride),
        outputs=(tap,),
    )
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False), variables, x)
    shape = out[tap].shape
    return int(shape[3]), (int(shape[1]), int(shape[2]))


def _image_size(config) -> int:
    manifest = os.path.join(config.data.dir, "manifest.json")
    if os.path.exists(manifest):
        size = config_utils.read_json(manifest, what="the data manifest").get("image_size", 256)
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    return int(config.data.synthetic_size) if config.dataset == "synthetic" else 256


def select(phase1: str, *, threshold: float = DEFAULT_THRESHOLD, agg: str = "all") -> dict:
    """The layers-file object of the phase-1 runs under `phase1` (see the module docstring for the rule)."""
    if agg not in AGGREGATIONS:
        raise LomtError(f"--agg must be one of {list(AGGREGATIONS)}, got {agg!r}")
    if not 0 <= threshold < 1:
        raise LomtError(f"--threshold must be in [0, 1) (a fraction of a conv's input channels), got {threshold!r}")
    runs = phase1_runs(phase1)
    depths = {int(c.model.depth) for rs in runs.values() for _, c in rs}
    if len(depths) != 1:
        raise LomtError(f"{phase1} mixes ResNetD depths {sorted(depths)}; select on runs of one depth")
    (depth,) = depths
    convs = graph.candidate_convs(depth)
    tasks = {}
    for task, task_runs in sorted(runs.items()):
        if len(task_runs) > 1:
            raise LomtError(
                f"{phase1} has {len(task_runs)} single-task runs of {task!r} ({', '.join(d for d, _ in task_runs)}); "
                "keep one run per task in the phase-1 directory"
            )
        (run_dir, config) = task_runs[0]
        trials = _finished_trials(run_dir, int(config.num_trials))
        counts, totals = [], None
        for trial in trials:
            c, totals = conv_counts(restore_backbone(trial, config), depth)
            counts.append(c)
        flags = active_flags(np.array(counts), np.array(totals), threshold)
        active = aggregate(flags, agg)
        index = select_index(active)
        if index is None:
            raise LomtError(
                f"task {task!r}: every candidate conv is inactive under --agg {agg} in {', '.join(trials)}; "
                "phase 1 was too sparse (lower its λ) or lower --threshold"
            )
        tap = convs[index]
        channels, resolution = tap_shape(config, tap, _image_size(config))
        tasks[task] = {
            "tap": tap,
            "tap_index": index,
            "channels": channels,
            "resolution": list(resolution),
            "image_size": _image_size(config),
            "run": run_dir,
            "trials": trials,
            "active_inputs": counts,
            "flags": flags.astype(int).tolist(),
            "aggregated": active.astype(int).tolist(),
        }
    return {
        "version": LAYERS_FILE_VERSION,
        "rule": RULE,
        "threshold": threshold,
        "agg": agg,
        "depth": depth,
        "convs": convs,
        "input_channels": totals,
        "tasks": tasks,
    }


def plot_pattern(task: str, entry: Mapping, convs: Sequence[str], totals: Sequence[int], path: str) -> None:
    """Spy plot of one task: trials (and the aggregate) × candidate convs, active fraction, the tap marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = np.asarray(entry["active_inputs"], np.float64) / np.maximum(np.asarray(totals, np.float64), 1)
    rows = np.vstack([frac, np.asarray(entry["aggregated"], np.float64)])
    labels = [f"trial {os.path.basename(t).split('_')[-1]}" for t in entry["trials"]] + ["aggregated"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(convs)), 1.2 + 0.35 * len(labels)))
    ax.imshow(rows, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.axvline(entry["tap_index"] + 0.5, color="#c44e52", linewidth=2)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xticks(range(len(convs)))
    ax.set_xticklabels(convs, rotation=90, fontsize=5)
    ax.set_title(
        f"{task}: active input channels per conv; tap {entry['tap']} (red line: later convs dropped)", fontsize=8
    )
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def write_selection(result: dict, out: str) -> list[str]:
    """Writes the layers file and one `lomt_pattern_<task>.png` per task next to it; returns the paths."""
    fileio.write_json(out, result, indent=1)
    written = [out]
    for task, entry in result["tasks"].items():
        png = os.path.join(os.path.dirname(os.path.abspath(out)), f"lomt_pattern_{task}.png")
        plot_pattern(task, entry, result["convs"], result["input_channels"], png)
        written.append(png)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Comparison of LOMT and conventional MTL (the report of a lomt_vs_mtl sweep)


def comparison_cells(task_sets: Sequence[Sequence[str]]) -> list[dict]:
    """The cells of a LOMT-vs-MTL sweep file: every task set as `<tasks>__mtl` (each head at the backbone's end:
    no layers file) and as `<tasks>__lomt` (heads at the taps of the base config's `lomt.layers_file`)."""
    cells = []
    for tasks in task_sets:
        name = "+".join(tasks)
        cells.append({"_name": f"{name}__mtl", "tasks": tuple(tasks), "lomt.layers_file": ""})
        cells.append({"_name": f"{name}__lomt", "tasks": tuple(tasks)})
    return cells


def measure_model(config, run_dir: str, image_size: int) -> dict:
    """XLA FLOPs and the compiled eval forward (batch 1, float32) of a run's best checkpoint, heads included."""
    import jax
    import jax.numpy as jnp

    from mtl_sparse_jax import benchmark

    model, params, batch_stats, _ = benchmark.restore_best(config, run_dir)
    variables = {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats)}
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return benchmark.compile_ahead(lambda v, x: model.apply(v, x, train=False), variables, x)


def comparison_rows(sweep, summary: dict, workdir: str, *, bench: bool = True, repeats: int = 10) -> list[dict]:
    """One row per task of every task set that the sweep ran both as conventional MTL and as LOMT (same λ and
    prox): each model's paper metric, Δ (%) of LOMT over MTL for the task and Δm over the set, and each model's
    XLA FLOPs and median latency (batch 1, fp32, the two models timed alternately)."""
    from mtl_sparse_jax import metrics as metrics_lib
    from mtl_sparse_jax.experiments import sweep as sweep_lib
    from mtl_sparse_jax.experiments import tables

    by_name = {c["name"]: c for c in summary["cells"]}
    cells = {c.name: c for c in sweep.cells}
    columns = {col.split("/")[0]: col for col in tables.paper_columns(summary)}
    groups: dict[tuple, dict[str, str]] = {}
    for cell in sweep.cells:
        kind = "lomt" if model_taps(cell.config) else "mtl"
        groups.setdefault((cell.tasks, cell.lam, cell.prox), {})[kind] = cell.name
    rows = []
    for (tasks, lam, prox), pair in groups.items():
        if set(pair) != {"mtl", "lomt"}:
            continue
        mtl, lo = by_name[pair["mtl"]], by_name[pair["lomt"]]
        if not (mtl["trials_done"] and lo["trials_done"]):
            continue
        cols = [columns[t] for t in tasks if t in columns]
        dirs = tables.directions(cols)
        got = {
            k: {c: s["metrics"][c]["mean"] for c in cols if c in s["metrics"]} for k, s in (("mtl", mtl), ("lomt", lo))
        }
        both = [c for c in cols if c in got["mtl"] and c in got["lomt"] and c in dirs]
        dm = metrics_lib.delta_m(got["lomt"], got["mtl"], {c: dirs[c] for c in both}) if both else None
        cost = {"mtl": {}, "lomt": {}}
        if bench:
            from mtl_sparse_jax import benchmark

            size = _image_size(cells[pair["mtl"]].config)
            compiled = {
                k: measure_model(cells[pair[k]].config, sweep_lib.cell_dir(workdir, cells[pair[k]]), size)
                for k in ("mtl", "lomt")
            }
            times = benchmark.time_interleaved(compiled, repeats=repeats)
            for k in compiled:
                cost[k] = {"flops": compiled[k].flops, "latency_ms": float(np.median(times[k]))}
        taps = dict(model_taps(cells[pair["lomt"]].config))
        for col in cols:
            task = col.split("/")[0]
            one = (
                metrics_lib.delta_m({col: got["lomt"][col]}, {col: got["mtl"][col]}, {col: dirs[col]})
                if col in both
                else None
            )
            rows.append(
                {
                    "tasks": list(tasks),
                    "lam": lam,
                    "task": task,
                    "metric": col,
                    "tap": taps.get(task, ""),
                    "mtl": mtl["metrics"].get(col),
                    "lomt": lo["metrics"].get(col),
                    "delta": one,
                    "delta_m": dm,
                    "trials": [mtl["trials_done"], lo["trials_done"]],
                    "flops": [cost["mtl"].get("flops"), cost["lomt"].get("flops")],
                    "latency_ms": [cost["mtl"].get("latency_ms"), cost["lomt"].get("latency_ms")],
                }
            )
    return rows


def comparison_markdown(rows: Sequence[Mapping]) -> str:
    def metric(m):
        return "—" if m is None else f"{m['mean']:.4f} ± {m['std']:.4f}"

    def num(x, fmt):
        return "—" if x is None else format(x, fmt)

    lines = [
        "| tasks | λ | task | tap | metric | MTL | LOMT | Δ task (%) | Δm set (%) | MFLOPs MTL / LOMT | ms MTL / LOMT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = " / ".join(num(None if f is None else f / 1e6, ".1f") for f in r["flops"])
        ms = " / ".join(num(t, ".2f") for t in r["latency_ms"])
        lines.append(
            f"| {'+'.join(r['tasks'])} | {r['lam']:g} | {r['task']} | `{r['tap']}` | `{r['metric']}` | "
            f"{metric(r['mtl'])} | {metric(r['lomt'])} | {num(r['delta'], '+.2f')} | {num(r['delta_m'], '+.2f')} | "
            f"{flops} | {ms} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(sweep, summary: dict, workdir: str, *, bench: bool = True, repeats: int = 10) -> list[str]:
    """WORKDIR/tables/lomt_vs_mtl.{md,json} when the sweep pairs LOMT and conventional cells; else nothing."""
    if not any(model_taps(c.config) for c in sweep.cells):
        return []
    rows = comparison_rows(sweep, summary, workdir, bench=bench, repeats=repeats)
    if not rows:
        return []
    out = os.path.join(workdir, "tables")
    head = (
        "LOMT against conventional MTL: each task's paper metric (mean ± std over trials), Δ of LOMT over MTL "
        "(positive: LOMT better), and each model's XLA FLOPs and median latency (batch 1, fp32, eval forward "
        "with heads).\n\n"
    )
    fileio.write_text(os.path.join(out, "lomt_vs_mtl.md"), head + comparison_markdown(rows))
    fileio.write_json(os.path.join(out, "lomt_vs_mtl.json"), rows, indent=1)
    return [os.path.join(out, "lomt_vs_mtl.md"), os.path.join(out, "lomt_vs_mtl.json")]


# ----------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through the error boundary, not argparse's usage block
        raise LomtError(f"{message}; see python -m mtl_sparse_jax.lomt select --help")


def _main(argv: Sequence[str]) -> int:
    parser = _Parser(prog="python -m mtl_sparse_jax.lomt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("select", help="choose each task's tap from its phase-1 runs; write the layers file")
    s.add_argument("--phase1", required=True, help="workdir of the phase-1 sweep (one single-task run per task)")
    s.add_argument("--out", required=True, help="the layers file to write, e.g. runs/lomt_phase1/lomt_layers.json")
    s.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="active: > this fraction of C_in")
    s.add_argument("--agg", choices=AGGREGATIONS, default="all", help="trial aggregation (default: all)")
    s.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    args = parser.parse_args(argv)
    result = select(args.phase1, threshold=args.threshold, agg=args.agg)
    for path in write_selection(result, args.out):
        print(f"wrote {path}")
    for task, entry in result["tasks"].items():
        c, (h, w) = entry["channels"], entry["resolution"]
        print(f"{task}: tap {entry['tap']} ({c} channels, {h}x{w}), from {len(entry['trials'])} trial(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
