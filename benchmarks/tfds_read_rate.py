"""Read rate of the two input formats on the same converted data: our TFRecord reader against tfds's reader.

Converts a synthetic dataset once (it gets both manifest.json and the tfds metadata), then reads its train
split with `pipeline.iterate_batches(..., data_format='shards')` and `(..., data_format='tfds')`, taking turns
epoch by epoch so that both see the same machine load. The ratio is the median of the per-round ratios.

    python benchmarks/tfds_read_rate.py [--size 256 --num 128 --batch-size 16 --rounds 3 --out /tmp/tfds_rate]

Prints one markdown table; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from data_prep import synthetic
from mtl_sparse_jax.data import pipeline


def _epoch(data_dir, data_format, *, cache, epoch, batch_size) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    for batch in pipeline.iterate_batches(
        data_dir,
        "train",
        tasks=["seg", "depth", "normals", "edge"],
        batch_size=batch_size,
        train=True,
        seed=0,
        epoch=epoch,
        cache=cache,
        process_index=0,
        process_count=1,
        data_format=data_format,
    ):
        count += len(batch["weight"])
    return time.perf_counter() - start, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--num", type=int, default=128, help="training examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="epochs per format and setting, taking turns")
    parser.add_argument("--out", default="/tmp/tfds_rate")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    data_dir = os.path.join(args.out, "data")
    synthetic.generate(
        data_dir, num_train=args.num, num_val=8, num_test=8, image_size=args.size, shard_size=32, num_workers=0
    )
    rows = []
    for cache in (False, True):
        times = {"shards": [], "tfds": []}
        first = {}
        for data_format in ("shards", "tfds"):  # the first epoch of a cached split decodes it: timed apart
            first[data_format], _ = _epoch(data_dir, data_format, cache=cache, epoch=0, batch_size=args.batch_size)
        for round_index in range(args.rounds):
            for data_format in ("shards", "tfds") if round_index % 2 == 0 else ("tfds", "shards"):
                seconds, count = _epoch(
                    data_dir, data_format, cache=cache, epoch=round_index + 1, batch_size=args.batch_size
                )
                times[data_format].append(seconds)
        ratio = float(np.median(np.array(times["tfds"]) / np.array(times["shards"])))
        rates = {k: count / float(np.median(v)) for k, v in times.items()}
        label = "cached in memory" if cache else "streamed"
        rows.append(
            f"| {label} | {rates['shards']:.0f} (first epoch {count / first['shards']:.0f}) | "
            f"{rates['tfds']:.0f} (first epoch {count / first['tfds']:.0f}) | {ratio:.2f}× |"
        )
    print(f"{args.num} records of {args.size}x{args.size}, batch {args.batch_size}, {args.rounds} rounds")
    print("| read | shards images/s | tfds images/s | tfds time / shards time |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
