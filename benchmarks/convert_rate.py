"""Conversion throughput of data_prep.nyu (records/s written at 256²) on a fake raw NYUD_MT dataset.

    python benchmarks/convert_rate.py [--num 200] [--workers 1 2] [--size 256] [--shard-size 64] [--tmp DIR]

Builds `--num` fake NYUD_MT examples at 480×640 (JPEG photo, 8-bit label PNG, depth/normals/edge .npy, as in
the real export), then times a full conversion into a fresh directory for each worker count. The timed span
includes process start-up of the workers (spawned, each imports TensorFlow), because a user pays it too.

It also measures how much the order of depth normalisation and resizing matters on synthetic room-like depth
maps: the reference normalises at 480×640 (/max, clip to [0.1, p99]) and then resizes; this project resizes
at conversion and normalises in the pipeline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from data_prep import nyu  # noqa: E402
from data_prep.resize import resize_bilinear  # noqa: E402

H, W = 480, 640


def room_depth(rng) -> np.ndarray:
    """A plausible indoor depth map in metres: a slanted floor/wall plane, a few boxes, ~5% invalid blobs."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    depth = 1.0 / (rng.uniform(0.08, 0.12) + rng.uniform(0.0, 2e-4) * v + rng.uniform(-5e-5, 5e-5) * u)
    for _ in range(rng.integers(2, 6)):
        y0, x0 = rng.integers(0, H - 80), rng.integers(0, W - 80)
        h, w = rng.integers(40, 200), rng.integers(40, 250)
        depth[y0 : y0 + h, x0 : x0 + w] = np.minimum(depth[y0 : y0 + h, x0 : x0 + w], rng.uniform(0.8, 4.0))
    depth = np.clip(depth, 0.5, 10.0)
    holes = np.zeros((H // 16, W // 16)) < 0
    holes |= rng.uniform(size=holes.shape) < 0.05
    depth[np.kron(holes, np.ones((16, 16), bool))] = 0.0
    return depth.astype(np.float32)


def make_fake_nyud_mt(root: str, num: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    ids = [f"img_{i:04d}" for i in range(num)]
    for example_id in ids:
        # a smooth photo-like image (random noise would make JPEG/PNG coding unrealistically expensive)
        base = rng.integers(0, 256, (H // 16, W // 16, 3), dtype=np.uint8)
        photo = np.asarray(Image.fromarray(base).resize((W, H), Image.BILINEAR))
        Image.fromarray(photo).save(os.path.join(root, "images", f"{example_id}.jpg"), quality=90)
        labels = np.kron(rng.integers(0, 41, (H // 32, W // 32)), np.ones((32, 32), np.int64)).astype(np.uint8)
        Image.fromarray(labels).save(os.path.join(root, "segmentation", f"{example_id}.png"))
        depth = room_depth(rng)
        normals = np.zeros((H, W, 3), np.float32)
        normals[..., 2] = np.where(depth > 0, -1.0, 0.0)
        np.save(os.path.join(root, "depth", f"{example_id}.npy"), depth)
        np.save(os.path.join(root, "normals", f"{example_id}.npy"), normals)
        np.save(os.path.join(root, "edge", f"{example_id}.npy"), (labels != np.roll(labels, 1, 0)).astype(np.float32))
    with open(os.path.join(root, "gt_sets", "train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def reference_normalise(depth: np.ndarray) -> np.ndarray:
    divided = depth.astype(np.float64) / depth.max()
    return np.clip(divided, 0.1, np.percentile(divided, 99))


def depth_order_effect(num: int, size: int, seed: int = 1) -> dict:
    """Reference (normalise at full size, then resize) vs ours (resize, then normalise), in normalised units."""
    rng = np.random.default_rng(seed)
    all_abs, valid_abs, max_abs = [], [], 0.0
    for _ in range(num):
        depth = room_depth(rng)
        reference = resize_bilinear(reference_normalise(depth), size, size)
        resized = resize_bilinear(depth, size, size)
        ours = reference_normalise(resized)
        diff = np.abs(reference - ours)
        valid = resize_bilinear((depth > 0).astype(np.float32), size, size) == 1.0  # no invalid pixel nearby
        all_abs.append(diff.mean())
        valid_abs.append(diff[valid].mean())
        max_abs = max(max_abs, float(diff.max()))
    return {
        "mean_abs_all": float(np.mean(all_abs)),
        "mean_abs_away_from_holes": float(np.mean(valid_abs)),
        "max_abs": max_abs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--tmp", default=None, help="scratch folder (default: a new temp dir, removed after)")
    args = parser.parse_args()
    scratch = args.tmp or tempfile.mkdtemp(prefix="convert_rate_")
    try:
        src = os.path.join(scratch, "src")
        if not os.path.isdir(src):
            t0 = time.perf_counter()
            make_fake_nyud_mt(src, args.num)
            print(f"fake NYUD_MT: {args.num} examples at {H}x{W} in {time.perf_counter() - t0:.1f} s")
        for workers in args.workers:
            out = os.path.join(scratch, f"out_w{workers}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            nyu.convert(src, out, size=args.size, shard_size=args.shard_size, workers=workers, log=lambda *_: None)
            elapsed = time.perf_counter() - t0
            shard_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".tfrecord"))
            print(
                f"workers={workers}: {args.num} records in {elapsed:.1f} s = {args.num / elapsed:.1f} records/s; "
                f"{shard_bytes / args.num / 1024:.0f} KiB/record"
            )
        # Where the time goes, in this process: reading + validating + resizing vs encoding a record.
        from data_prep.shards import serialize_example

        ids = [f"img_{i:04d}" for i in range(min(args.num, 40))]
        t0 = time.perf_counter()
        examples = [nyu.nyud_mt_example(i, src=src, size=args.size) for i in ids]
        build_ms = (time.perf_counter() - t0) / len(ids) * 1e3
        t0 = time.perf_counter()
        for example in examples:
            serialize_example(example)
        encode_ms = (time.perf_counter() - t0) / len(ids) * 1e3
        print(
            f"per record, one process: read+validate+resize {build_ms:.1f} ms, encode (PNG + tf.train.Example) "
            f"{encode_ms:.1f} ms"
        )
        effect = depth_order_effect(20, args.size)
        print(
            "depth normalise-then-resize vs resize-then-normalise (normalised units, 20 synthetic maps): "
            + ", ".join(f"{k} {v:.4f}" for k, v in effect.items())
        )
    finally:
        if args.tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
