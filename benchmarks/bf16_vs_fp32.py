"""bfloat16 compute against float32: the same init, the same batches, the real train step; losses and sparsity.

    python benchmarks/bf16_vs_fp32.py --config demo --steps 48 [--lam 1e-3]     # demo size (ResNetD-50 1/8, 64²)
    python benchmarks/bf16_vs_fp32.py --config tiny --steps 24 --lam 2e-2      # tests/tiny_config.py

`model.dtype='bfloat16'` computes convs and activations in bfloat16; params, BN statistics, losses, the
optimizer and the prox stay float32. Both runs start from the same parameters (the init does not depend on the
compute dtype) and see the same batches (the device loader, seed 0, epochs 0, 1, ...). Reported: the train loss
at the start and end, the group sparsity of each run and the agreement of their zero-group patterns (the share
of channel groups that are zero in both or nonzero in both, and the Jaccard index of the zero sets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def zero_group_mask(trainer, params) -> np.ndarray:
    """One bool per channel group of the grouped kernels: True where the whole group is exactly zero."""
    from mtl_sparse_jax import sparsity  # noqa: PLC0415

    masks = []
    for _, leaf, axis in sparsity.flatten_grouped(params, trainer.group_axes(params)):
        leaf = np.asarray(leaf)
        other = tuple(a for a in range(leaf.ndim) if a != axis)
        masks.append(np.all(leaf == 0, axis=other))
    return np.concatenate(masks)


def train_run(config, data_dir: str, steps: int) -> dict:
    """`steps` train steps of the real jitted step on device-loader batches; per-step total losses and zero mask."""
    from mtl_sparse_jax import training  # noqa: PLC0415
    from mtl_sparse_jax.data import device, spec  # noqa: PLC0415

    manifest = spec.load_manifest(data_dir, verify="none")
    trainer = training.step_spec(config)
    state = training.create_train_state(
        trainer, tuple(manifest["image_size"]), config.seed, learning_rate=config.optimizer.lr, lam=config.sparsity.lam
    )
    stats = training.init_train_stats(trainer)
    rng = jax.random.PRNGKey(config.seed + 10_000)
    losses = []
    epoch = 0
    start = time.perf_counter()
    while len(losses) < steps:
        for batch in device.iterate_batches(
            data_dir,
            "train",
            tasks=trainer.task_names,
            batch_size=config.batch_size,
            train=True,
            seed=config.seed,
            epoch=epoch,
            depth_norm=config.data.depth_norm,
            depth_max_m=config.data.depth_max_m,
            sharding=trainer.batch_sharding,
        ):
            state, step_losses, stats = training.train_step(trainer, state, batch, rng, stats)
            losses.append(float(step_losses["total"]))
            if len(losses) == steps:
                break
        epoch += 1
    mask = zero_group_mask(trainer, state.params)
    return {"losses": losses, "zero_groups": mask, "seconds": time.perf_counter() - start}


def compare(config, data_dir: str, steps: int) -> dict:
    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = config.copy_and_resolve_references()
        c.model.dtype = dtype
        runs[dtype] = train_run(c, data_dir, steps)
    a, b = runs["float32"]["zero_groups"], runs["bfloat16"]["zero_groups"]
    union = np.sum(a | b)
    return {
        "steps": steps,
        "groups": int(a.size),
        "losses": {k: v["losses"] for k, v in runs.items()},
        "seconds": {k: v["seconds"] for k, v in runs.items()},
        "group_sparsity_percent": {k: 100.0 * float(np.mean(v["zero_groups"])) for k, v in runs.items()},
        "pattern_agreement": float(np.mean(a == b)),
        "zero_set_jaccard": float(np.sum(a & b) / union) if union else 1.0,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lam", type=float, default=None, help="sparsity.lam (default: the config's)")
    parser.add_argument("--data", default="/tmp/bf16_vs_fp32/data")
    args = parser.parse_args(argv)
    from data_prep import synthetic  # noqa: PLC0415
    from mtl_sparse_jax.data import device  # noqa: PLC0415

    if args.config == "demo":
        from configs import demo as module  # noqa: PLC0415
    else:
        import tiny_config as module  # noqa: PLC0415
    config = module.get_config()
    size = config.data.synthetic_size if args.config == "demo" else 32
    num_train = config.data.synthetic_num_train if args.config == "demo" else 64
    data_dir = f"{args.data}_{args.config}"
    synthetic.generate(data_dir, num_train=num_train, num_val=8, num_test=8, image_size=size, seed=0, num_classes=6)
    device.prepare_split(data_dir, "train")
    config.data.dir = data_dir
    if args.lam is not None:
        config.sparsity.lam = args.lam
    result = compare(config, data_dir, args.steps)
    result.update(config=args.config, lam=config.sparsity.lam, date=time.strftime("%Y-%m-%d %H:%M %Z"))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    for dtype, losses in result["losses"].items():
        head, tail = np.mean(losses[:3]), np.mean(losses[-3:])
        print(f"{dtype}: train loss, mean of the first 3 steps {head:.4f}, of the last 3 {tail:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
