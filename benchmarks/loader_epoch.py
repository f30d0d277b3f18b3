"""Per-epoch time of the demo with the device-resident loader against the tf.data loader, side by side.

    python benchmarks/loader_epoch.py [--data /tmp/loader_epoch/data --epochs 2 --rounds 3 --no-train]

1. Loader only: one training epoch of the demo's train split (batch 32, seg + normals + depth, 64²), every batch
   placed on the mesh and waited for, the two loaders taking turns for `--rounds` rounds (the first round of each
   includes decoding: tf.data fills its cache, the device loader loads its arrays; the .npy arrays are decoded
   from the shards before timing).
2. Training (unless --no-train): the demo config (configs/demo.py) for `--epochs` epochs with each loader, in this
   process, after a one-step warm-up run that compiles the train and eval steps for both; reports the wall time
   of the whole run (train, validation, test, checkpoints) and the trainer's steady-state train images/s.

Prints markdown; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mtl_sparse_jax.data import device, pipeline  # noqa: E402

TASKS = ("seg", "normals", "depth")


def loader_epoch_seconds(loader: str, data_dir: str, sharding, epoch: int, batch_size: int) -> float:
    start = time.perf_counter()
    common = dict(tasks=TASKS, batch_size=batch_size, train=True, seed=0, epoch=epoch, depth_norm="fixed")
    if loader == "device":
        last = None
        for batch in device.iterate_batches(data_dir, "train", sharding=sharding, **common):
            last = batch
    else:
        last = None
        for batch in pipeline.iterate_batches(data_dir, "train", **common):
            last = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    jax.block_until_ready(last)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/loader_epoch/data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args(argv)
    from configs import demo
    from data_prep import synthetic

    config = demo.get_config()
    synthetic.generate(
        args.data,
        num_train=config.data.synthetic_num_train,
        num_val=config.data.synthetic_num_val,
        num_test=config.data.synthetic_num_test,
        image_size=config.data.synthetic_size,
        seed=config.seed,
        num_classes=config.seg_num_classes,
    )
    t = time.perf_counter()
    for split in ("train", "val", "test"):
        device.prepare_split(args.data, split)
    print(f"decoding the .npy arrays (once): {time.perf_counter() - t:.1f} s", flush=True)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    times = {"tfdata": [], "device": []}
    for r in range(args.rounds):
        for loader in ("tfdata", "device"):
            times[loader].append(loader_epoch_seconds(loader, args.data, sharding, r, config.batch_size))
    steps = pipeline.steps_per_epoch(args.data, "train", config.batch_size, train=True)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"\nLoader only: one train epoch ({steps} batches of {config.batch_size}, 64²), seconds per round\n")
    print("| loader | " + " | ".join(f"round {r}" for r in range(args.rounds)) + " | images/s (best) |")
    print("|---|" + "---|" * (args.rounds + 1))
    for loader, values in times.items():
        rate = steps * config.batch_size / min(values)
        print(f"| {loader} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {rate:.0f} |")
    if args.no_train:
        return 0

    from mtl_sparse_jax import train

    rows = []
    for loader in ("warm-up", "tfdata", "device"):
        work = os.path.join(os.path.dirname(args.data), f"run_{loader}")
        shutil.rmtree(work, ignore_errors=True)
        config = demo.get_config()
        config.data.dir = args.data
        config.data.generate_if_missing = False
        config.data.loader = "tfdata" if loader == "warm-up" else loader
        config.num_epochs = 1 if loader == "warm-up" else args.epochs
        config.steps_per_epoch = 1 if loader == "warm-up" else 0
        config.log.progress = False
        start = time.perf_counter()
        train.train_and_evaluate(config, work)
        total = time.perf_counter() - start
        with open(os.path.join(work, "trial_0", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        rates = [r["images_per_sec"] for r in records if r["split"] == "train"]
        losses = [round(r["loss/total"], 6) for r in records if r["split"] == "train"]
        if loader != "warm-up":
            rows.append((loader, total, rates, losses))
    print(f"\nDemo training, {args.epochs} epochs each (compiled by a warm-up run first)\n")
    print("| loader | wall s (train + val + test + checkpoints) | train images/s per epoch | train loss per epoch |")
    print("|---|---|---|---|")
    for loader, total, rates, losses in rows:
        print(f"| {loader} | {total:.1f} | {', '.join(f'{r:.1f}' for r in rates)} | {losses} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
