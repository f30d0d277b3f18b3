"""Data throughput: records/s written by the shard writer and images/s read back through the input pipeline.

Uses the synthetic dataset at 256x256 with every NYU-like feature (image, seg, depth, normals, edge), so the
record sizes match a converted NYU-v2 (about 1.2 MB per record, depth and normals stored as raw float32).

    python benchmarks/data_rate.py [--size 256 --num 256 --batch-size 16 --epochs 3 --out /tmp/data_rate]

Prints one markdown table; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import sys
import time

import numpy as np

from data_prep import shards, synthetic
from mtl_sparse_jax.data import pipeline as input_pipeline

_RENDERED: dict[str, dict] = {}


def _prerendered(key: str) -> dict:
    return _RENDERED[key]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--num", type=int, default=256, help="training examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="read epochs per pipeline setting")
    parser.add_argument("--out", default="/tmp/data_rate")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rows = []

    # 1. End to end: render + validate + encode + write, in this process (the demo's default).
    start = time.perf_counter()
    synthetic.generate(
        os.path.join(args.out, "data"),
        num_train=args.num,
        num_val=16,
        num_test=16,
        image_size=args.size,
        shard_size=64,
        num_workers=0,
    )
    elapsed = time.perf_counter() - start
    total = args.num + 32
    rows.append(("synthetic generate (render + write), 1 process", f"{total / elapsed:.1f} records/s"))

    # 2. The writer alone (validate + PNG encode + serialise + write + sha256), examples already in memory.
    builder = functools.partial(synthetic.build_example, seed=1, image_size=args.size, num_classes=6)
    keys = [f"s1-train-{i:06d}" for i in range(args.num)]
    for key in keys:
        _RENDERED[key] = builder(key)
    start = time.perf_counter()
    entry = shards.write_split(
        os.path.join(args.out, "write_only"),
        "train",
        keys,
        _prerendered,
        shard_size=64,
        num_workers=0,
        num_classes={"seg": 6},
    )
    elapsed = time.perf_counter() - start
    megabytes = sum(s["bytes"] for s in entry["shards"]) / 1e6
    rows.append(
        (
            "shard writer only, 1 process",
            f"{args.num / elapsed:.1f} records/s "
            f"({megabytes / elapsed:.0f} MB/s, {megabytes * 1e6 / args.num / 1e6:.2f} MB/record)",
        )
    )

    # 3. Read back through make_dataset, all NYU-like tasks, training order, reference depth normalisation.
    data_dir = os.path.join(args.out, "data")
    tasks = ["seg", "depth", "normals", "edge"]
    for cache in (False, True):
        rates = []
        for epoch in range(args.epochs + 1):
            start = time.perf_counter()
            images = 0
            for batch in input_pipeline.iterate_batches(
                data_dir,
                "train",
                tasks=tasks,
                batch_size=args.batch_size,
                train=True,
                epoch=epoch,
                cache=cache,
                process_index=0,
                process_count=1,
            ):
                images += batch["image"].shape[0]
            rates.append(images / (time.perf_counter() - start))
        label = "cached in memory (epochs after the first)" if cache else "streamed from shards"
        # Epoch 0 pays the decode (and, cached, fills the cache); report it apart from the steady state.
        rows.append(
            (
                f"make_dataset read, {label}",
                f"{np.median(rates[1:]):.0f} images/s (first epoch {rates[0]:.0f} images/s)",
            )
        )

    print(f"machine: {platform.node()} · {os.cpu_count()} CPU cores · python {platform.python_version()}")
    print(f"size {args.size}x{args.size}, {args.num} train records, batch {args.batch_size}, tasks {tasks}\n")
    print("| measurement | rate |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
