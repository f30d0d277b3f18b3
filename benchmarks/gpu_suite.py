"""The GPU benchmark suite: train step, prox share, data loaders, dense and compact inference, trial estimate.

    benchmarks/gpu_suite.sh OUT_DIR                  # the full suite (one GPU, ~8 min budget)
    python benchmarks/gpu_suite.py --smoke --out D   # tiny sizes, on a CPU in well under a minute

Writes OUT_DIR/gpu_suite.json and OUT_DIR/gpu_suite.md. Needs JAX, Flax, optax and numpy (the project's models,
`sparsity`, `compaction` and the device loader); not TensorFlow and not ml-collections: the model and the train
step are built here from `mtl_sparse_jax.models`, `tasks`, `losses` and `sparsity`, as `train.Trainer` builds
them (uncertainty weighting, prox-AdamW with the default hyperparameters). The tf.data row runs only where
TensorFlow is importable. Data are synthetic, in memory: NYU-shaped examples (image, 40-class seg, depth in
metres, unit normals) at 256², written as the device loader's arrays.

Sections, in this order, each skipped (and marked so) once `--budget-s` seconds have passed:

1. loaders: one epoch of the device-resident loader against tf.data (where TensorFlow exists), batch 16.
2. train: the 3-task NYU step (ResNetD-50, DeepLab heads, output stride 8) at 256², bfloat16 then float32, at
   batch 16, 32, 64 and 128: ms/step (median of `--steps`), images/s, XLA's FLOPs per step and the model FLOP
   utilisation against the device's dense peak (H100/H200: bf16 989, fp32 494 TFLOP/s: TF32 tensor cores,
   which XLA uses for float32 convs by default).
3. prox: the optimizer update alone (prox-AdamW, prox='adaptive' and prox='none'); the prox's share of each
   measured step is (adaptive - none) / step.
4. inference: eval-mode latency, dense (the Flax model with its zeros) and compact (`compaction.compact`), of the
   backbone and of the whole model, at 60 % random group sparsity, batch 1, 16 and 128.
5. trial: epochs × (train split / train images/s at batch 16 + test split / dense inference images/s at batch 16).

The physical estimate it is compared with: 260 GFLOPs per image fwd+bwd (XLA's count at 256²) at a quarter of
~790 bf16 TFLOP/s gives ~700 images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mtl_sparse_jax import compaction, models, sparsity  # noqa: E402
from mtl_sparse_jax import losses as losses_lib  # noqa: E402
from mtl_sparse_jax import tasks as tasks_lib  # noqa: E402
from mtl_sparse_jax.data import device as device_loader  # noqa: E402
from mtl_sparse_jax.data import spec as data_spec  # noqa: E402

PEAK_TFLOPS = {"H200": {"bfloat16": 989.0, "float32": 494.0}, "H100": {"bfloat16": 989.0, "float32": 494.0}}
ESTIMATE_IMAGES_PER_S = 700.0  # 260 GFLOPs/image at 1/4 of ~790 bf16 TFLOP/s
GROUP_RULE = r"^backbone/.*kernel$"
NYU_TRAIN, NYU_TEST = 795, 654

FULL = dict(
    depth=50,
    width=1.0,
    head_width=1.0,
    size=256,
    num_classes=40,
    train_batches=(16, 32, 64, 128),
    dtypes=("bfloat16", "float32"),
    infer_batches=(1, 16, 128),
    infer_dtypes=("bfloat16", "float32"),
    examples=256,
    steps=10,
    repeats=10,
    budget_s=420.0,
)
SMOKE = dict(
    depth=18,
    width=0.0625,
    head_width=0.0625,
    size=32,
    num_classes=6,
    train_batches=(2,),
    dtypes=("float32",),
    infer_batches=(1, 2),
    infer_dtypes=("float32",),
    examples=8,
    steps=2,
    repeats=2,
    budget_s=600.0,  # the smoke run exercises every section; it is small, not time-boxed
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _median_ms(fn, args, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), times


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        value = float(cost.get("flops", -1)) if cost else -1
        return value if value > 0 else None
    except Exception:  # noqa: BLE001  (not every backend reports a cost)
        return None


def _peak(device, dtype: str) -> float | None:
    if device.platform != "gpu":
        return None
    for name, peaks in PEAK_TFLOPS.items():
        if name in device.device_kind:
            return peaks[dtype] * 1e12
    return None


# --------------------------------------------------------------------------------------------------
# Synthetic data in the device loader's format


def synthetic_arrays(n: int, size: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "seg": rng.integers(0, num_classes, (n, size, size), dtype=np.uint8),
        "depth": rng.uniform(0.5, 10.0, (n, size, size, 1)).astype(np.float32),
        "normals": normals,
        "id": np.array([f"train-{i}".encode() for i in range(n)]),
    }


def arrays_only_dataset(out: str, arrays: dict, size: int, num_classes: int) -> str:
    """A data directory with a manifest and the device loader's arrays but no shards (no TensorFlow needed)."""
    os.makedirs(out, exist_ok=True)
    n = len(arrays["id"])
    manifest = {
        "format": data_spec.FORMAT_NAME,
        "format_version": data_spec.FORMAT_VERSION,
        "dataset": "synthetic-nyu-shaped",
        "source_layout": "gpu_suite (arrays only, no shards)",
        "image_size": [size, size],
        "features": ["image", "seg", "depth", "normals"],
        "num_classes": {"seg": num_classes},
        "splits": {
            "train": {
                "num_examples": n,
                "shards": [
                    {"file": "train-00000-of-00001.tfrecord", "num_examples": n, "sha256": "0" * 64, "bytes": 0}
                ],
            }
        },
    }
    with open(os.path.join(out, data_spec.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    device_loader.write_arrays(out, "train", arrays)
    return out


def sharded_dataset(out: str, arrays: dict, size: int, num_classes: int) -> str:
    """Real TFRecord shards of the same examples (needs TensorFlow), with the device loader's arrays decoded."""
    from data_prep import shards  # noqa: PLC0415

    def example(key):
        i = int(key.split("-")[-1])
        return {
            "id": key,
            "image": arrays["image"][i],
            "seg": arrays["seg"][i],
            "depth": arrays["depth"][i, ..., 0],
            "normals": arrays["normals"][i],
        }

    keys = [k.decode() for k in arrays["id"]]
    entry = shards.write_split(
        out, "train", keys, example, shard_size=64, num_workers=0, num_classes={"seg": num_classes}
    )
    shards.write_manifest(
        out,
        dataset="synthetic-nyu-shaped",
        source_layout="gpu_suite",
        image_size=(size, size),
        features=entry["features"],
        num_classes={"seg": num_classes},
        splits={"train": entry},
    )
    device_loader.prepare_split(out, "train")
    return out


def time_loader_epoch(name, data_dir, batch_size, sharding, epochs=3) -> dict:
    tasks = ("seg", "normals", "depth")
    n = data_spec.load_manifest(data_dir, verify="none")["splits"]["train"]["num_examples"]
    steps = data_spec.steps_for(n, batch_size, train=True)
    seconds = []
    for epoch in range(epochs):
        t = time.perf_counter()
        common = dict(tasks=tasks, batch_size=batch_size, train=True, seed=0, epoch=epoch, depth_norm="reference")
        last = None
        if name == "device":
            for batch in device_loader.iterate_batches(data_dir, "train", sharding=sharding, verify="none", **common):
                last = batch
        else:
            from mtl_sparse_jax.data import pipeline  # noqa: PLC0415

            for batch in pipeline.iterate_batches(data_dir, "train", **common):
                last = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        jax.block_until_ready(last)
        seconds.append(time.perf_counter() - t)
    best = min(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {
        "loader": name,
        "batch_size": batch_size,
        "steps": steps,
        "epoch_seconds": seconds,
        "images_per_sec": steps * batch_size / best,
        "note": "first epoch loads/decodes; images/s from the best later epoch",
    }


# --------------------------------------------------------------------------------------------------
# Model and train step (as train.Trainer builds them, without ml-collections)


def build_model(s: dict, dtype: str):
    task_specs = {
        "seg": tasks_lib.get_task("seg", num_classes=s["num_classes"], loss_resolution="feature"),
        "normals": tasks_lib.get_task("normals", loss_resolution="feature"),
        "depth": tasks_lib.get_task("depth", loss_resolution="feature"),
    }
    heads = [models.HeadSpec(name=t.name, kind=t.head, out_channels=t.out_channels) for t in task_specs.values()]
    model = models.MultiTaskModel(
        heads=heads,
        depth=s["depth"],
        width_multiplier=s["width"],
        head_width_multiplier=s["head_width"],
        output_stride=8,
        dtype=jnp.dtype(dtype),
    )
    return model, task_specs


def init_variables(model, size: int, seed: int = 0):
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    key = jax.random.key(seed, impl="rbg")
    variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, dummy, train=False))(key)
    return dict(variables["params"]), dict(variables["batch_stats"])


def make_optimizer(params, prox: str):
    group_axes = sparsity.group_axes_by_regex(params, rules=((GROUP_RULE, 2),), ndim=4)
    return sparsity.prox_adamw(1e-4, 1e-5, group_axes, weight_decay=0.1, prox=prox), group_axes


def make_train_step(model, task_specs, tx):
    names = tuple(task_specs)

    def step(params, batch_stats, opt_state, batch, rng):
        def loss_fn(p):
            model_params = {k: v for k, v in p.items() if k != "loss_weights"}
            outputs, new_vars = model.apply(
                {"params": model_params, "batch_stats": batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            task_losses = {}
            for name, task in task_specs.items():
                num, den = task.loss_terms(outputs[name], batch)
                task_losses[name] = num / jnp.maximum(den, 1e-12)
            total = losses_lib.combine_losses("uncertainty", task_losses, p["loss_weights"])
            return total, new_vars["batch_stats"]

        (total, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, total

    del names
    return jax.jit(step, donate_argnums=(0, 1, 2))


def bench_train(s, dtype, batch_size, data_dir, mesh, log) -> dict:
    model, task_specs = build_model(s, dtype)
    params, batch_stats = init_variables(model, s["size"])
    params["loss_weights"] = losses_lib.init_loss_weights("uncertainty", tuple(task_specs))
    tx, _ = make_optimizer(params, "adaptive")
    opt_state = tx.init(params)
    sharding = NamedSharding(mesh, P("data"))
    batch = next(
        device_loader.iterate_batches(
            data_dir,
            "train",
            tasks=tuple(task_specs),
            batch_size=batch_size,
            train=True,
            sharding=sharding,
            verify="none",
        )
    )
    step = make_train_step(model, task_specs, tx)
    rng = jax.random.PRNGKey(0)
    t = time.perf_counter()
    compiled = step.lower(params, batch_stats, opt_state, batch, rng).compile()
    compile_s = time.perf_counter() - t
    flops = _flops(compiled)
    state = [params, batch_stats, opt_state]
    for _ in range(2):
        state[0], state[1], state[2], loss = compiled(*state, batch, rng)
    jax.block_until_ready(state)
    times = []
    for _ in range(s["steps"]):
        t = time.perf_counter()
        state[0], state[1], state[2], loss = compiled(*state, batch, rng)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    row = {
        "dtype": dtype,
        "batch_size": batch_size,
        "ms_per_step": ms,
        "images_per_sec": batch_size / (ms / 1e3),
        "flops_per_step": flops,
        "compile_s": compile_s,
        "loss": float(loss),
        "times_ms": times,
    }
    peak = _peak(jax.devices()[0], dtype)
    row["mfu"] = flops / (ms / 1e3) / peak if (flops and peak) else None
    log(f"train {dtype} b={batch_size}: {ms:.1f} ms/step, {row['images_per_sec']:.1f} img/s, compile {compile_s:.0f} s")
    return row


def bench_prox(s, repeats, log) -> dict:
    model, task_specs = build_model(s, "float32")
    params, _ = init_variables(model, s["size"])
    params["loss_weights"] = losses_lib.init_loss_weights("uncertainty", tuple(task_specs))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 1e-3, p.shape).astype(np.float32)), params)
    out = {}
    for prox in ("adaptive", "none"):
        tx, _ = make_optimizer(params, prox)
        opt_state = tx.init(params)

        def update(g, o, p, tx=tx):
            updates, o = tx.update(g, o, p)
            return optax.apply_updates(p, updates), o

        fn = jax.jit(update)
        out[prox], _ = _median_ms(fn, (grads, opt_state, params), repeats)
    log(f"optimizer update: adaptive prox {out['adaptive']:.2f} ms, no prox {out['none']:.2f} ms")
    return {
        "update_ms_adaptive": out["adaptive"],
        "update_ms_none": out["none"],
        "prox_ms": out["adaptive"] - out["none"],
    }


def random_group_sparsity(params, group_axes, fraction: float, seed: int = 0):
    """Zeros round(fraction · C_in) random input-channel groups (at least one kept) of every backbone kernel."""
    rng = np.random.default_rng(seed)
    backbone = jax.tree.map(np.array, params["backbone"])

    def visit(tree):
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                visit(leaf)
            elif name == "kernel" and leaf.ndim == 4:
                cin = leaf.shape[2]
                drop = rng.choice(cin, size=min(cin - 1, int(round(fraction * cin))), replace=False)
                leaf[:, :, drop, :] = 0.0

    visit(backbone)
    del group_axes
    return {**params, "backbone": backbone}


def bench_inference(s, dtypes, batches, repeats, out, log, deadline) -> dict:
    model, task_specs = build_model(s, "float32")
    params, batch_stats = init_variables(model, s["size"])
    group_axes = sparsity.group_axes_by_regex(params, rules=((GROUP_RULE, 2),), ndim=4)
    params = random_group_sparsity(params, group_axes, 0.6)
    measured = float(sparsity.stats(params, group_axes)["group_sparsity"])
    size = s["size"]
    t = time.perf_counter()
    compact_mt = compaction.compact(params, batch_stats, model, input_size=(size, size))
    backbone = models.ResNetD(depth=s["depth"], width_multiplier=s["width"], output_stride=8)
    compact_bb = compaction.compact(params["backbone"], batch_stats["backbone"], backbone, input_size=(size, size))
    compaction_s = time.perf_counter() - t
    log(f"inference: group sparsity {measured:.1f} %, compaction {compaction_s:.1f} s")
    rows = []
    for dtype in dtypes:
        dt = jnp.dtype(dtype)
        for variant, dense_model, variables, cm in (
            (
                "backbone",
                backbone.clone(dtype=dt),
                {"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
                compact_bb,
            ),
            ("multitask", model.clone(dtype=dt), {"params": params, "batch_stats": batch_stats}, compact_mt),
        ):
            for batch in batches:
                if time.perf_counter() > deadline:
                    rows.append({"variant": variant, "dtype": dtype, "batch_size": batch, "skipped": "budget"})
                    continue
                images = jax.random.uniform(jax.random.PRNGKey(batch), (batch, size, size, 3))
                try:
                    dense = jax.jit(lambda v, x, m=dense_model: m.apply(v, x, train=False))
                    compact = jax.jit(lambda p, x, cm=cm, dt=dt: cm.apply(p, x, dtype=dt))
                    dense_ms, _ = _median_ms(dense, (variables, images), repeats)
                    compact_ms, _ = _median_ms(compact, (cm.params, images), repeats)
                except Exception as e:  # noqa: BLE001  (an out-of-memory batch is a result, not a crash)
                    rows.append({"variant": variant, "dtype": dtype, "batch_size": batch, "error": _first_line(e)})
                    continue
                rows.append(
                    {
                        "variant": variant,
                        "dtype": dtype,
                        "batch_size": batch,
                        "dense_ms": dense_ms,
                        "compact_ms": compact_ms,
                        "speedup": dense_ms / compact_ms,
                        "dense_images_per_sec": batch / (dense_ms / 1e3),
                    }
                )
                log(f"inference {variant} {dtype} b={batch}: dense {dense_ms:.2f} ms, compact {compact_ms:.2f} ms")
    del out
    return {
        "group_sparsity_percent": measured,
        "compaction_s": compaction_s,
        "conv_flops_per_image": {"dense": compact_bb.dense_flops(1), "compact": compact_bb.flops(1)},
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# Report


def markdown(result: dict) -> str:
    lines = [
        "# GPU suite",
        "",
        f"{result['machine']}; {result['date']}; mode {result['mode']}; model ResNetD-{result['settings']['depth']} "
        f"width {result['settings']['width']} at {result['settings']['size']}²; {result['wall_s']:.0f} s wall.",
        "",
        "## Train step (3 tasks)",
        "",
        "| dtype | batch | ms/step | images/s | GFLOPs/step (XLA) | MFU | prox share | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["train"]:
        if "ms_per_step" not in r:
            lines.append(
                f"| {r['dtype']} | {r['batch_size']} | {r.get('error') or 'skipped: ' + r.get('skipped', '')} |||||"
            )
            continue
        gf = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        share = f"{r['prox_share']:.1%}" if r.get("prox_share") is not None else "n/a"
        lines.append(
            f"| {r['dtype']} | {r['batch_size']} | {r['ms_per_step']:.1f} | {r['images_per_sec']:.1f} | {gf} | {mfu} | "
            f"{share} | {r['compile_s']:.0f} |"
        )
    best = max((r["images_per_sec"] for r in result["train"] if "images_per_sec" in r), default=None)
    if best:
        lines += [
            "",
            f"Best train rate {best:.0f} images/s against the compute-bound estimate of "
            f"{ESTIMATE_IMAGES_PER_S:.0f} images/s ({best / ESTIMATE_IMAGES_PER_S:.2f}×).",
        ]
    prox = result.get("prox") or {}
    if "prox_ms" in prox:
        lines += [
            "",
            f"Optimizer update alone: {prox['update_ms_adaptive']:.2f} ms with the adaptive prox, "
            f"{prox['update_ms_none']:.2f} ms without: the prox costs {prox['prox_ms']:.2f} ms per step.",
        ]
    lines += ["", "## Loaders (one train epoch, batches placed on the device)", ""]
    lines += ["| loader | batch | images/s | epoch s (the first loads / decodes) |", "|---|---|---|---|"]
    for r in result["loaders"]:
        if "images_per_sec" in r:
            seconds = ", ".join(f"{x:.2f}" for x in r["epoch_seconds"])
            lines.append(f"| {r['loader']} | {r['batch_size']} | {r['images_per_sec']:.0f} | {seconds} |")
        else:
            lines.append(f"| {r['loader']} | | {r.get('error') or r.get('skipped')} | |")
    inf = result.get("inference") or {}
    where = f"{inf['group_sparsity_percent']:.1f} %" if "group_sparsity_percent" in inf else "60 % (not run)"
    lines += [
        "",
        f"## Inference at {where} group sparsity",
        "",
        "| variant | dtype | batch | dense ms | compact ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in inf.get("rows", []):
        if "dense_ms" in r:
            lines.append(
                f"| {r['variant']} | {r['dtype']} | {r['batch_size']} | {r['dense_ms']:.2f} | {r['compact_ms']:.2f} | "
                f"{r['speedup']:.2f}× |"
            )
        else:
            lines.append(
                f"| {r['variant']} | {r['dtype']} | {r['batch_size']} | {r.get('error') or r.get('skipped')} | | |"
            )
    trial = result.get("trial") or {}
    lines += ["", "## Full NYU trial (estimate)", ""]
    if result["mode"] == "smoke":
        lines += ["(smoke mode: tiny model and images; the numbers only show that every section runs)", ""]
    if "hours" in trial:
        lines.append(
            f"{trial['epochs']} epochs × ({NYU_TRAIN} train images at {trial['train_images_per_sec']:.0f} img/s + "
            f"{NYU_TEST} test images at {trial['eval_images_per_sec']:.0f} img/s) = {trial['epoch_s']:.2f} s/epoch, "
            f"{trial['hours']:.2f} h per trial ({trial['dtype']}, batch 16; early stopping usually ends sooner)."
        )
    else:
        lines.append(f"not estimated: {trial.get('why', 'missing rows')}")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU in well under a minute")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this")
    parser.add_argument("--trial-epochs", type=int, default=1000, help="epochs of a full trial (configs/nyu.py)")
    args = parser.parse_args(argv)
    s = dict(SMOKE if args.smoke else FULL)
    if args.budget_s is not None:
        s["budget_s"] = args.budget_s
    start = time.perf_counter()
    deadline = start + s["budget_s"]
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    dev = jax.devices()[0]
    mesh = Mesh(np.array([dev]), ("data",))
    result = {
        "machine": f"{dev.device_kind} ({dev.platform}), {platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": "smoke" if args.smoke else "full",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "loaders": [],
        "train": [],
        "prox": None,
        "inference": None,
        "trial": None,
    }
    work = tempfile.mkdtemp(prefix="gpu_suite_")
    arrays = synthetic_arrays(max(s["examples"], max(s["train_batches"])), s["size"], s["num_classes"])
    data_dir = arrays_only_dataset(os.path.join(work, "arrays"), arrays, s["size"], s["num_classes"])
    loader_batch = min(16, max(s["train_batches"]))
    sharding = NamedSharding(mesh, P("data"))

    # 1. loaders
    result["loaders"].append(time_loader_epoch("device", data_dir, loader_batch, sharding))
    try:
        import tensorflow  # noqa: F401, PLC0415

        have_tf = True
    except ImportError:
        have_tf = False
    if have_tf:
        try:
            shard_dir = sharded_dataset(os.path.join(work, "shards"), arrays, s["size"], s["num_classes"])
            result["loaders"].append(time_loader_epoch("tfdata", shard_dir, loader_batch, sharding))
        except Exception as e:  # noqa: BLE001
            result["loaders"].append({"loader": "tfdata", "error": _first_line(e)})
    else:
        result["loaders"].append({"loader": "tfdata", "skipped": "TensorFlow is not installed"})
    device_loader.clear_cache()

    # 2. train steps
    for dtype in s["dtypes"]:
        for batch in s["train_batches"]:
            if time.perf_counter() > deadline:
                result["train"].append({"dtype": dtype, "batch_size": batch, "skipped": "budget"})
                continue
            try:
                result["train"].append(bench_train(s, dtype, batch, data_dir, mesh, log))
            except Exception as e:  # noqa: BLE001  (an out-of-memory batch is a result, not a crash)
                log(f"train {dtype} b={batch} failed: {_first_line(e)}")
                result["train"].append({"dtype": dtype, "batch_size": batch, "error": _first_line(e)})
    device_loader.clear_cache()

    # 3. prox share
    if time.perf_counter() < deadline:
        try:
            result["prox"] = bench_prox(s, s["repeats"], log)
            for r in result["train"]:
                if "ms_per_step" in r:
                    r["prox_share"] = result["prox"]["prox_ms"] / r["ms_per_step"]
        except Exception as e:  # noqa: BLE001
            result["prox"] = {"error": _first_line(e)}
    else:
        result["prox"] = {"skipped": "budget"}

    # 4. inference
    if time.perf_counter() < deadline:
        try:
            result["inference"] = bench_inference(
                s, s["infer_dtypes"], s["infer_batches"], s["repeats"], args.out, log, deadline
            )
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["inference"] = {"error": _first_line(e), "rows": []}
    else:
        result["inference"] = {"skipped": "budget", "rows": []}

    # 5. trial estimate, from the batch-16 (or smallest) train row and the dense multitask inference at that batch
    train_rows = [r for r in result["train"] if "images_per_sec" in r]
    infer_rows = [r for r in result["inference"]["rows"] if r.get("variant") == "multitask" and "dense_ms" in r]
    if train_rows and infer_rows:
        tr = min(train_rows, key=lambda r: (r["dtype"] != "bfloat16", abs(r["batch_size"] - 16)))
        ir = min(infer_rows, key=lambda r: (r["dtype"] != tr["dtype"], abs(r["batch_size"] - 16)))
        epoch_s = NYU_TRAIN / tr["images_per_sec"] + NYU_TEST / ir["dense_images_per_sec"]
        result["trial"] = {
            "epochs": args.trial_epochs,
            "dtype": tr["dtype"],
            "train_images_per_sec": tr["images_per_sec"],
            "eval_images_per_sec": ir["dense_images_per_sec"],
            "epoch_s": epoch_s,
            "hours": args.trial_epochs * epoch_s / 3600,
        }
    else:
        result["trial"] = {"why": "no train or inference row was measured"}

    result["wall_s"] = time.perf_counter() - start
    _write_atomic(os.path.join(args.out, "gpu_suite.json"), json.dumps(result, indent=2, default=float))
    _write_atomic(os.path.join(args.out, "gpu_suite.md"), markdown(result))
    log(f"wrote {os.path.join(args.out, 'gpu_suite.json')} and gpu_suite.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
