"""Cost of the converters' source fingerprint: stat'ing every source file of every example before a conversion.

    python benchmarks/source_fingerprint.py [--num 30000] [--parts 6] [--tmp DIR]

Builds a CelebAMask-HQ-shaped tree of empty files (`--num` photos, `--parts` of the 18 part masks per image,
the attribute file), then times what `write_split` does before it builds anything: one digest per 256-key
shard over `celeba.celeba_files(key)` (20 paths per key, most part masks absent). It compares the listing
cache that `data_prep.shards` uses (each directory listed once, one stat per existing file) with one stat per
path, side by side in this process.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from data_prep import celeba, shards  # noqa: E402


def stat_every_path(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=30000)
    parser.add_argument("--parts", type=int, default=6, help="part masks present per image (of 18)")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir=args.tmp)
    try:
        os.makedirs(os.path.join(root, celeba.IMAGE_DIR))
        for n in range(args.num):
            open(os.path.join(root, celeba.IMAGE_DIR, f"{n}.jpg"), "wb").close()
            os.makedirs(os.path.dirname(celeba.part_mask_path(root, n, "skin")), exist_ok=True)
            for part in celeba.PART_ORDER[: args.parts]:
                open(celeba.part_mask_path(root, n, part), "wb").close()
        attribute_file = os.path.join(root, celeba.ATTRIBUTE_FILE)
        open(attribute_file, "wb").close()
        files = functools.partial(celeba.celeba_files, src=root, attribute_file=attribute_file)
        keys = [str(n) for n in range(args.num)]
        batches = [keys[i : i + 256] for i in range(0, len(keys), 256)]
        per_key = len(files(keys[0]))

        start = time.perf_counter()
        stats = shards._SourceStats()
        cached = [shards._shard_source(batch, files, stats) for batch in batches]
        cached_s = time.perf_counter() - start
        start = time.perf_counter()
        plain = [stat_every_path([p for key in batch for p in files(key)]) for batch in batches]
        plain_s = time.perf_counter() - start
        assert len(cached) == len(plain)
        print(f"{args.num} keys x {per_key} paths ({args.parts + 2} exist), {len(batches)} shards")
        print(f"listing cache (data_prep.shards): {cached_s:.2f} s ({cached_s / args.num * 1e6:.0f} us/key)")
        print(f"one stat per path:                {plain_s:.2f} s ({plain_s / args.num * 1e6:.0f} us/key)")
        print(f"load average: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
