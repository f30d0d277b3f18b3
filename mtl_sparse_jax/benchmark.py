"""Inference and train-step timing: dense-with-zeros against physically compacted models, jit-compiled.

Inference (``bench.json`` + ``bench.md`` in ``--out``):

  python -m mtl_sparse_jax.benchmark --random-sparsity 0.6 --depth 50 --size 256 --batch-sizes 1,8 \\
      --dtypes float32,bfloat16 --repeats 20 --out runs/bench
  python -m mtl_sparse_jax.benchmark --workdir runs/nyu --out runs/nyu/bench      # a trained checkpoint
  python -m mtl_sparse_jax.main --mode bench --workdir runs/nyu                    # the same, into runs/nyu/bench

For every variant ('backbone': ResNetD features only; 'multitask': backbone and all heads), model
('dense': the Flax model with its zeros, 'compact': ``compaction.compact``), dtype and batch size it compiles the
function ahead of time (``jit(...).lower(...).compile()``, timed separately), warms it up, and times ``repeats``
calls, each ended by ``block_until_ready``. Dense and compact calls alternate, so that a machine busy with other
work slows both alike; the speedup is the ratio of their medians. FLOPs are XLA's cost analysis of the compiled
function (``flops``) and the analytic 2·MACs of the backbone convs (``conv_flops``).

Random sparsity (``--random-sparsity s``) zeros whole input-channel groups of the backbone convs of a randomly
initialised model, as the prox does: in every conv a random subset of round(s·C_in) input channels (at least one
channel kept), and with probability ``--whole-layer-prob`` a whole conv inside a block (conv1/conv2/conv3). BN
statistics are set from one pass over a random batch, so activations have realistic magnitudes.

A sweep (``--sweep 0,0.3,0.6,0.8,0.9``) times the backbone at several sparsities and plots latency against group
sparsity (``latency_vs_sparsity.png``).

Train-step throughput (``--train-step``) runs the real jitted train step (``training.train_step``: model, losses,
prox-AdamW) on synthetic in-memory batches, for 1 task and for 3 tasks, and reports images/s, XLA's FLOPs per
step and, on a GPU, the model FLOP utilisation:

  python -m mtl_sparse_jax.benchmark --train-step --depth 50 --size 256 --batch-sizes 16 --out runs/train_bench

This module imports nothing from TensorFlow, so it runs on a machine that has only JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_sparse_jax import cli, compaction, config_utils, fileio, models, report, sparsity

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_TASKS = (("seg", "deeplab", 40), ("normals", "deeplab", 3), ("depth", "deeplab", 1))
# Dense bf16 / fp32-class peak FLOP/s per device kind, for the model FLOP utilisation (tensor cores, no sparsity).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


class BenchmarkError(ValueError):
    """Bad benchmark arguments or inputs; the message names the flag or file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Sparsity patterns


def backbone_conv_kernels(backbone_params: Mapping, depth: int) -> dict[str, np.ndarray]:
    out = {}
    for path in models.conv_paths(depth):
        node = backbone_params
        for part in path.split("/"):
            node = node[part]
        out[path] = node["kernel"]
    return out


def group_sparsity(backbone_params: Mapping, depth: int) -> float:
    """Fraction of the backbone's input-channel groups (HWIO axis 2) that are exactly zero."""
    masks = [np.asarray(sparsity.zero_group_mask(k, 2)) for k in backbone_conv_kernels(backbone_params, depth).values()]
    return sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)


def random_group_sparsity(
    backbone_params: Mapping, depth: int, sparsity: float, *, seed: int = 0, whole_layer_prob: float = 0.05
) -> dict:
    """A copy of the backbone params with whole input-channel groups zeroed the way the prox leaves them.

    Each conv loses a random round(sparsity·C_in) of its input channels (always keeping one); with probability
    ``whole_layer_prob`` a conv inside a block (conv1/conv2/conv3) is zeroed entirely. The stem and downsample
    convs are never zeroed whole, so the network still depends on its input.
    """
    if not 0.0 <= sparsity < 1.0:
        raise BenchmarkError(f"--random-sparsity must be in [0, 1), got {sparsity}")
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: np.array(a, dtype=np.float32), backbone_params)
    for path, k in backbone_conv_kernels(params, depth).items():
        cin = k.shape[2]
        block_conv = path.split("/")[-1] in ("conv1", "conv2", "conv3")
        if block_conv and rng.random() < whole_layer_prob:
            k[:] = 0
            continue
        n_zero = min(int(round(sparsity * cin)), cin - 1)
        k[:, :, rng.choice(cin, size=n_zero, replace=False), :] = 0
    return params


def calibrate_batch_stats(backbone: models.ResNetD, backbone_params, batch_stats, images) -> dict:
    """Running statistics equal to one train-mode pass's batch statistics (momentum 1), as after training."""
    calib = backbone.clone(bn_updates=1000, dtype=jnp.float32)
    _, updated = jax.jit(lambda v, x: calib.apply(v, x, train=True, mutable=["batch_stats"]))(
        {"params": backbone_params, "batch_stats": batch_stats}, images
    )
    return jax.tree.map(np.asarray, updated["batch_stats"])


# ----------------------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Compiled:
    fn: Callable
    args: tuple
    compile_s: float
    flops: float | None


def compile_ahead(fn: Callable, *args) -> Compiled:
    """``jit(fn).lower(*args).compile()``, timed; FLOPs from XLA's cost analysis when it gives them."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = None
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        if cost and cost.get("flops", -1) >= 0:
            flops = float(cost["flops"])
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        flops = None
    return Compiled(compiled, args, compile_s, flops)


def time_interleaved(runs: Mapping[str, Compiled], *, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Latencies in ms of each compiled function, calls alternating between them, each one blocked on."""
    for c in runs.values():
        for _ in range(warmup):
            jax.block_until_ready(c.fn(*c.args))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, c in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(c.fn(*c.args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarise(latencies_ms: Sequence[float], batch_size: int) -> dict:
    ordered = sorted(latencies_ms)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(np.ceil(0.9 * len(ordered))) - 1)]
    return {
        "latency_ms_median": median,
        "latency_ms_p90": p90,
        "latency_ms_min": ordered[0],
        "images_per_sec": batch_size / (median / 1e3),
        "repeats": len(ordered),
    }


# ----------------------------------------------------------------------------------------------------------------
# Inference benchmark


@dataclasses.dataclass
class BenchSetup:
    """A sparse model to benchmark: the Flax multi-task model, its variables and the compacted versions."""

    model: models.MultiTaskModel
    params: dict  # {'backbone', 'head_<task>'}
    batch_stats: dict
    size: int
    source: str


def _backbone_module(model: models.MultiTaskModel, dtype) -> models.ResNetD:
    return models.ResNetD(
        depth=model.depth, width_multiplier=model.width_multiplier, output_stride=model.output_stride, dtype=dtype
    )


def random_variables(model, images, *, seed: int = 0) -> dict:
    """Variables of ``model`` drawn in numpy with the layers' PyTorch init: kernels and biases U(±1/√fan_in), BN
    scale 1 and bias 0, running mean 0 and variance 1. Compiling Flax's random init is far slower on a CPU."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    rng = np.random.default_rng(seed)

    def fill(tree, is_stats):
        out = {}
        fan_in = None
        if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
            fan_in = int(np.prod(tree["kernel"].shape[:-1]))
        for name, leaf in tree.items():
            if isinstance(leaf, Mapping):
                out[name] = fill(leaf, is_stats)
            elif is_stats:
                out[name] = (np.zeros if name == "mean" else np.ones)(leaf.shape, np.float32)
            elif fan_in is not None:  # a conv or dense layer: kernel and bias
                bound = 1.0 / np.sqrt(fan_in)
                out[name] = rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
            else:  # BatchNorm
                out[name] = (np.ones if name == "scale" else np.zeros)(leaf.shape, np.float32)
        return out

    return {"params": fill(shapes["params"], False), "batch_stats": fill(shapes["batch_stats"], True)}


def random_setup(
    *,
    depth: int,
    width_multiplier: float,
    head_width_multiplier: float,
    size: int,
    sparsity: float,
    seed: int = 0,
    whole_layer_prob: float = 0.05,
    tasks: Sequence[tuple[str, str, int]] = DEFAULT_TASKS,
    output_stride: int = 8,
) -> BenchSetup:
    """A randomly initialised multi-task model with a random group-sparsity pattern and calibrated BN stats."""
    heads = [models.HeadSpec(*t) for t in tasks]
    model = models.MultiTaskModel(
        heads=heads,
        depth=depth,
        width_multiplier=width_multiplier,
        head_width_multiplier=head_width_multiplier,
        output_stride=output_stride,
    )
    images = jax.random.uniform(jax.random.PRNGKey(seed + 1), (4, size, size, 3))
    variables = random_variables(model, images[:1], seed=seed)
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    params["backbone"] = random_group_sparsity(
        params["backbone"], depth, sparsity, seed=seed, whole_layer_prob=whole_layer_prob
    )
    stats["backbone"] = calibrate_batch_stats(
        _backbone_module(model, jnp.float32), params["backbone"], stats["backbone"], images
    )
    return BenchSetup(
        model,
        params,
        stats,
        size,
        f"random init, random group sparsity {sparsity} (whole-layer prob {whole_layer_prob}, seed {seed})",
    )


def bench_setup(
    setup: BenchSetup,
    *,
    batch_sizes: Sequence[int],
    dtypes: Sequence[str],
    repeats: int,
    variants: Sequence[str] = ("backbone", "multitask"),
    log=print,
) -> dict:
    """Times dense-with-zeros against compact for each variant, dtype and batch size; returns the bench.json dict."""
    model, size = setup.model, setup.size
    t0 = time.perf_counter()
    compact_mt = compaction.compact(setup.params, setup.batch_stats, model, input_size=(size, size))
    compact_bb = compaction.compact(
        setup.params["backbone"],
        setup.batch_stats["backbone"],
        _backbone_module(model, jnp.float32),
        input_size=(size, size),
    )
    compaction_s = time.perf_counter() - t0
    dense_vars = {"params": setup.params, "batch_stats": setup.batch_stats}
    backbone_vars = {"params": setup.params["backbone"], "batch_stats": setup.batch_stats["backbone"]}
    sparsity_value = group_sparsity(setup.params["backbone"], model.depth)
    result: dict[str, Any] = {
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "source": setup.source,
        "model": {
            "depth": model.depth,
            "width_multiplier": model.width_multiplier,
            "head_width_multiplier": model.head_width_multiplier,
            "output_stride": model.output_stride,
            "tasks": [h.name for h in model.heads],
            "image_size": size,
        },
        "group_sparsity": sparsity_value,
        "compaction_seconds": compaction_s,
        "conv_flops_per_image": {"dense": compact_bb.dense_flops(1), "compact": compact_bb.flops(1)},
        "compaction_report": compact_mt.report,
        "results": [],
    }
    result["conv_flop_reduction"] = result["conv_flops_per_image"]["dense"] / max(
        1, result["conv_flops_per_image"]["compact"]
    )
    max_diff: dict[str, float] = {}
    scale: dict[str, float] = {}
    for variant in variants:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if variant == "backbone":
                dense_module = _backbone_module(model, dtype)
                dense_fn = lambda v, x, m=dense_module: m.apply(v, x, train=False)  # noqa: E731
                dense_args_vars = backbone_vars
                cm = compact_bb
            else:
                dense_module = model.clone(dtype=dtype)
                dense_fn = lambda v, x, m=dense_module: m.apply(v, x, train=False)  # noqa: E731
                dense_args_vars = dense_vars
                cm = compact_mt
            compact_fn = lambda p, x, cm=cm, dt=dtype: cm.apply(p, x, dtype=dt)  # noqa: E731
            for batch in batch_sizes:
                images = jax.random.uniform(jax.random.PRNGKey(batch), (batch, size, size, 3))
                runs = {
                    "dense": compile_ahead(dense_fn, dense_args_vars, images),
                    "compact": compile_ahead(compact_fn, cm.params, images),
                }
                if dtype_name == "float32" and variant not in max_diff:
                    dense_out = runs["dense"].fn(dense_args_vars, images)
                    compact_out = runs["compact"].fn(cm.params, images)
                    diffs = jax.tree.map(
                        lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))),
                        dense_out,
                        compact_out,
                    )
                    max_diff[variant] = max(jax.tree.leaves(diffs))
                    scale[variant] = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(dense_out))
                times = time_interleaved(runs, repeats=repeats)
                row = {}
                for name, c in runs.items():
                    entry = {
                        "variant": variant,
                        "model": name,
                        "dtype": dtype_name,
                        "batch_size": batch,
                        **summarise(times[name], batch),
                        "compile_s": c.compile_s,
                        "flops": c.flops,
                        "conv_flops": (cm.dense_flops(batch) if name == "dense" else cm.flops(batch)),
                    }
                    result["results"].append(entry)
                    row[name] = entry
                speedup = row["dense"]["latency_ms_median"] / row["compact"]["latency_ms_median"]
                row["compact"]["speedup_vs_dense"] = speedup
                if row["dense"]["flops"] and row["compact"]["flops"]:
                    row["compact"]["xla_flop_reduction"] = row["dense"]["flops"] / row["compact"]["flops"]
                log(
                    f"{variant:9s} {dtype_name:8s} b={batch:<3d} dense {row['dense']['latency_ms_median']:9.2f} ms  "
                    f"compact {row['compact']['latency_ms_median']:9.2f} ms  speedup {speedup:5.2f}x  "
                    f"(backbone conv FLOPs /{row['dense']['conv_flops'] / max(1, row['compact']['conv_flops']):.2f})"
                )
    result["max_abs_diff_compact_vs_dense"] = max(max_diff.values()) if max_diff else None
    result["max_abs_diff_compact_vs_dense_per_variant"] = max_diff
    result["max_abs_dense_output_per_variant"] = scale  # the scale the differences are relative to
    return result


def machine_description() -> str:
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "unknown"
    cpus = os.cpu_count()
    return (
        f"{platform.machine()} {platform.system()}, {cpus} CPU cores, JAX {jax.__version__} on "
        f"{len(devices)}× {devices[0].platform} ({kind})"
    )


def markdown_table(result: dict) -> str:
    lines = [
        f"Source: {result['source']}. Group sparsity {100 * result['group_sparsity']:.1f}%, "
        f"conv FLOP reduction {result['conv_flop_reduction']:.2f}×, "
        f"max |compact − dense| (fp32) {result['max_abs_diff_compact_vs_dense']:.2e}. "
        f"{result['machine']}, {result['date']}.",
        "",
        "| variant | dtype | batch | dense ms (median / p90) | compact ms (median / p90) | speedup | "
        "FLOP reduction (XLA) | backbone conv FLOP reduction | dense img/s | compact img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict] = {}
    for r in result["results"]:
        rows.setdefault((r["variant"], r["dtype"], r["batch_size"]), {})[r["model"]] = r
    for (variant, dtype, batch), pair in rows.items():
        d, c = pair["dense"], pair["compact"]
        xla = f"{d['flops'] / c['flops']:.2f}×" if d.get("flops") and c.get("flops") else "n/a"
        lines.append(
            f"| {variant} | {dtype} | {batch} | {d['latency_ms_median']:.2f} / {d['latency_ms_p90']:.2f} | "
            f"{c['latency_ms_median']:.2f} / {c['latency_ms_p90']:.2f} | "
            f"{d['latency_ms_median'] / c['latency_ms_median']:.2f}× | {xla} | "
            f"{d['conv_flops'] / max(1, c['conv_flops']):.2f}× | {d['images_per_sec']:.1f} | "
            f"{c['images_per_sec']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, stem: str = "bench") -> None:
    fileio.write_text(os.path.join(out_dir, f"{stem}.json"), json.dumps(result, indent=1, default=_json_default) + "\n")
    fileio.write_text(os.path.join(out_dir, f"{stem}.md"), markdown_table(result))


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# A trained checkpoint


def _image_size_for(config) -> int:
    manifest = os.path.join(config.data.dir, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            size = json.load(f).get("image_size", 256)
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    if config.dataset == "synthetic":
        return int(config.data.synthetic_size)
    return 256


def restore_best(config, workdir: str):
    """(model, params, batch_stats, trial) of the first trial with a 'best' checkpoint, restored on one device."""
    from mtl_sparse_jax import checkpoint as ckpt_lib
    from mtl_sparse_jax import training

    spec = training.step_spec(config, devices=jax.devices()[:1])
    target = training.eval_variables(training.abstract_train_state(spec, (32, 32)))
    for trial in range(config.num_trials):
        directory = os.path.join(workdir, f"trial_{trial}", "checkpoints")
        if not os.path.isdir(os.path.join(directory, "best")):
            continue
        ckpts = ckpt_lib.TrialCheckpoints(directory)
        try:
            best, _ = ckpts.restore("best", target)
        finally:
            ckpts.close()
        return spec.model, best["params"], best["batch_stats"], trial
    raise FileNotFoundError(f"no trial with a best checkpoint under {workdir}; train first with --mode train")


def run_from_workdir(
    config,
    workdir: str,
    *,
    out_dir: str | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    repeats: int = 20,
    size: int | None = None,
) -> dict:
    """Benchmarks the best checkpoint of a trained workdir; writes WORKDIR/bench/bench.json and bench.md."""
    model, params, batch_stats, trial = restore_best(config, workdir)
    size = size or _image_size_for(config)
    setup = BenchSetup(
        model,
        jax.tree.map(np.asarray, params),
        jax.tree.map(np.asarray, batch_stats),
        size,
        f"{workdir} trial {trial} best checkpoint",
    )
    result = bench_setup(setup, batch_sizes=batch_sizes, dtypes=dtypes, repeats=repeats)
    out_dir = out_dir or os.path.join(workdir, "bench")
    write_outputs(result, out_dir)
    print(markdown_table(result))
    print(f"wrote {os.path.join(out_dir, 'bench.json')} and bench.md")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Sweep and plot


def sweep(
    sparsities: Sequence[float],
    *,
    depth: int,
    width_multiplier: float,
    size: int,
    batch_size: int,
    dtype: str,
    repeats: int,
    seed: int,
    whole_layer_prob: float,
    log=print,
) -> list[dict]:
    """Backbone latency, dense-with-zeros and compact, at several random group sparsities."""
    points = []
    for s in sparsities:
        setup = random_setup(
            depth=depth,
            width_multiplier=width_multiplier,
            head_width_multiplier=0.25,
            size=size,
            sparsity=s,
            seed=seed,
            whole_layer_prob=whole_layer_prob,
            tasks=DEFAULT_TASKS[:1],
        )
        result = bench_setup(
            setup, batch_sizes=(batch_size,), dtypes=(dtype,), repeats=repeats, variants=("backbone",), log=log
        )
        pair = {r["model"]: r for r in result["results"]}
        points.append(
            {
                "target_sparsity": s,
                "group_sparsity": result["group_sparsity"],
                "dense_ms": pair["dense"]["latency_ms_median"],
                "compact_ms": pair["compact"]["latency_ms_median"],
                "dense_conv_flops": pair["dense"]["conv_flops"],
                "compact_conv_flops": pair["compact"]["conv_flops"],
                "max_abs_diff": result["max_abs_diff_compact_vs_dense"],
            }
        )
    return points


def plot_sweep(points: Sequence[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * p["group_sparsity"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    ax.plot(x, [p["dense_ms"] for p in points], "o-", label="dense with zeros")
    ax.plot(x, [p["compact_ms"] for p in points], "s-", label="compacted")
    ideal = [p["dense_ms"] * p["compact_conv_flops"] / p["dense_conv_flops"] for p in points]
    ax.plot(x, ideal, ":", color="gray", label="dense × conv FLOP ratio")
    ax.set_xlabel("group sparsity of the backbone (%)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    report.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Train-step throughput


def synthetic_batch(tasks: Mapping, batch_size: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """An in-memory batch with every target the tasks read, shaped as the input pipeline delivers them."""
    rng = np.random.default_rng(seed)
    batch = {"image": rng.random((batch_size, size, size, 3), np.float32), "weight": np.ones((batch_size,), np.float32)}
    for task in tasks.values():
        for key in task.target_keys:
            if key == "seg":
                classes = dict(task.options).get("num_classes", task.out_channels)
                batch[key] = rng.integers(0, classes, (batch_size, size, size)).astype(np.int32)
            elif key.endswith("_valid"):
                batch[key] = np.ones((batch_size, size, size, 1), np.float32)
            elif key.endswith("_scale"):
                batch[key] = np.full((batch_size,), 10.0, np.float32)
            elif key == "normals":
                n = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
                batch[key] = n / np.linalg.norm(n, axis=-1, keepdims=True)
            elif task.head == "classification":
                batch[key] = rng.integers(0, 2, (batch_size,)).astype(np.float32)
            else:
                batch[key] = rng.random((batch_size, size, size, 1), np.float32)
    return batch


def train_step_throughput(
    *,
    task_sets: Sequence[Sequence[str]],
    depth: int,
    width_multiplier: float,
    head_width_multiplier: float,
    size: int,
    batch_size: int,
    dtype: str,
    steps: int,
    log=print,
) -> dict:
    """Images/s of the real jitted train step on synthetic batches, per task set; MFU on a GPU."""
    from mtl_sparse_jax import defaults, training

    device = jax.devices()[0]
    results = []
    for task_names in task_sets:
        config = defaults.get_config()
        config.tasks = tuple(task_names)
        config.model.depth = depth
        config.model.width_multiplier = width_multiplier
        config.model.head_width_multiplier = head_width_multiplier
        config.model.dtype = dtype
        config.batch_size = batch_size
        spec = training.step_spec(config, devices=[device])
        state = training.create_train_state(spec, (size, size), 0, learning_rate=1e-4, lam=1e-5)
        batch = training.put_batch(spec, synthetic_batch(spec.task_map, batch_size, size))
        stats = training.init_train_stats(spec)
        rng = jax.random.PRNGKey(0)
        start = time.perf_counter()
        compiled = training.train_step.lower(spec, state, batch, rng, stats).compile()
        compile_s = time.perf_counter() - start
        flops = None
        try:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = float(cost["flops"]) if cost and cost.get("flops", -1) >= 0 else None
        except Exception:  # noqa: BLE001
            pass
        for _ in range(2):  # warm-up
            state, _, stats = compiled(state, batch, rng, stats)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, losses, stats = compiled(state, batch, rng, stats)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - t) * 1e3)
        summary = summarise(times, batch_size)
        entry = {
            "tasks": list(task_names),
            "batch_size": batch_size,
            "dtype": dtype,
            "compile_s": compile_s,
            "flops_per_step": flops,
            **summary,
        }
        peak = _peak_flops(device, dtype)
        if flops and peak:
            entry["mfu"] = flops / (summary["latency_ms_median"] / 1e3) / peak
            entry["peak_flops_assumed"] = peak
        results.append(entry)
        log(
            f"train step, tasks {','.join(task_names):22s} b={batch_size} {dtype}: {summary['latency_ms_median']:.1f} ms, "
            f"{summary['images_per_sec']:.1f} img/s" + (f", MFU {entry['mfu']:.1%}" if "mfu" in entry else "")
        )
    return {
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "model": {
            "depth": depth,
            "width_multiplier": width_multiplier,
            "head_width_multiplier": head_width_multiplier,
            "image_size": size,
        },
        "results": results,
    }


def _peak_flops(device, dtype: str) -> float | None:
    if device.platform != "gpu":
        return None
    for name, peaks in PEAK_TFLOPS.items():
        if name in device.device_kind:
            return peaks.get(dtype, peaks["float32"]) * 1e12
    return None


def train_markdown(result: dict) -> str:
    lines = [
        f"{result['machine']}, {result['date']}; ResNetD-{result['model']['depth']} width "
        f"{result['model']['width_multiplier']}, heads width {result['model']['head_width_multiplier']}, "
        f"{result['model']['image_size']}² images.",
        "",
        "| tasks | batch | dtype | step ms (median / p90) | images/s | GFLOPs/step (XLA) | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        gflops = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a (CPU)"
        lines.append(
            f"| {','.join(r['tasks'])} | {r['batch_size']} | {r['dtype']} | {r['latency_ms_median']:.1f} / "
            f"{r['latency_ms_p90']:.1f} | {r['images_per_sec']:.1f} | {gflops} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"{flag} must be comma-separated integers like 1,8,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise BenchmarkError(f"{flag} needs positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtl_sparse_jax.benchmark", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", help="a trained workdir (config.json + trial_<k>/checkpoints/best)")
    src.add_argument("--random-sparsity", type=float, default=None, help="group sparsity of a random pattern")
    p.add_argument("--sweep", default="", help="comma-separated sparsities: latency-vs-sparsity sweep and plot")
    p.add_argument("--train-step", action="store_true", help="train-step throughput, 1 task against 3")
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--size", type=int, default=None, help="image side (default 256; a workdir: its data size)")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width-multiplier", type=float, default=1.0)
    p.add_argument("--head-width-multiplier", type=float, default=1.0)
    p.add_argument("--variants", default="backbone,multitask")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--whole-layer-prob", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10, help="timed train steps (--train-step)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line, inside the project's error boundary: bad input is one `error:` line and exit code 2."""
    return cli.run(_main, argv)


def _main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise BenchmarkError(f"--dtypes: unknown {unknown}; use float32 and/or bfloat16")
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in ("backbone", "multitask") for v in variants):
        raise BenchmarkError(f"--variants must be backbone and/or multitask, got {args.variants!r}")
    if args.repeats < 1:
        raise BenchmarkError("--repeats must be >= 1")
    if args.train_step:
        result = train_step_throughput(
            task_sets=[("seg",), ("seg", "normals", "depth")],
            depth=args.depth,
            width_multiplier=args.width_multiplier,
            head_width_multiplier=args.head_width_multiplier,
            size=args.size or 256,
            batch_size=batch_sizes[0],
            dtype=dtypes[0],
            steps=args.steps,
        )
        fileio.write_text(os.path.join(args.out, "train_bench.json"), json.dumps(result, indent=1) + "\n")
        fileio.write_text(os.path.join(args.out, "train_bench.md"), train_markdown(result))
        print(train_markdown(result))
        return 0
    if args.sweep:
        sparsities = [float(s) for s in args.sweep.split(",") if s]
        args.size = args.size or 256
        points = sweep(
            sparsities,
            depth=args.depth,
            width_multiplier=args.width_multiplier,
            size=args.size,
            batch_size=batch_sizes[0],
            dtype=dtypes[0],
            repeats=args.repeats,
            seed=args.seed,
            whole_layer_prob=args.whole_layer_prob,
        )
        doc = {
            "machine": machine_description(),
            "date": time.strftime("%Y-%m-%d"),
            "settings": {
                "depth": args.depth,
                "width_multiplier": args.width_multiplier,
                "size": args.size,
                "batch_size": batch_sizes[0],
                "dtype": dtypes[0],
                "repeats": args.repeats,
            },
            "points": points,
        }
        fileio.write_text(os.path.join(args.out, "sweep.json"), json.dumps(doc, indent=1) + "\n")
        plot_sweep(
            points,
            os.path.join(args.out, "latency_vs_sparsity.png"),
            f"ResNetD-{args.depth} ×{args.width_multiplier} backbone, {args.size}², batch {batch_sizes[0]}, "
            f"{dtypes[0]}",
        )
        print(json.dumps(points, indent=1))
        return 0
    if args.workdir:
        config = config_utils.load(os.path.join(args.workdir, "config.json"))
        run_from_workdir(
            config,
            args.workdir,
            out_dir=args.out,
            batch_sizes=batch_sizes,
            dtypes=dtypes,
            repeats=args.repeats,
            size=args.size,
        )
        return 0
    sparsity_value = 0.6 if args.random_sparsity is None else args.random_sparsity
    setup = random_setup(
        depth=args.depth,
        width_multiplier=args.width_multiplier,
        head_width_multiplier=args.head_width_multiplier,
        size=args.size or 256,
        sparsity=sparsity_value,
        seed=args.seed,
        whole_layer_prob=args.whole_layer_prob,
    )
    result = bench_setup(setup, batch_sizes=batch_sizes, dtypes=dtypes, repeats=args.repeats, variants=variants)
    result["command"] = "python -m mtl_sparse_jax.benchmark " + " ".join(argv)
    write_outputs(result, args.out)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
