"""Shared shard writer for every dataset converter: TFRecord shards, resumable, parallel, atomic, checksummed.

A converter lists its example keys per split and gives a picklable `build_example(key) -> dict` that loads
one example (already resized to the dataset's image size). `write_split` validates every example against
`mtl_sparse_jax.data.spec`, writes the split's shards in worker processes and returns the split's manifest
entry; `write_manifest` then writes `manifest.json`, last, so that a directory with a manifest always holds
a finished conversion.

Resumability: shard k of n is written to a temporary file and renamed into place, and only then is a small
sidecar `.shard_state/<shard>.json` (its keys, count, sha256, bytes, skipped keys, fingerprint) renamed into
place. A rerun skips every shard whose sidecar matches the plan and whose file has the recorded size, so a
conversion killed at any moment resumes where it stopped and never reads back a half-written shard. The
fingerprint covers the options (image size, features, classes, --skip-bad) and the source: the converter's
`source_files(key)` names the files each example is read from, and the path, size and mtime of each of them
(or its absence) go into the shard's `source` digest. A changed --src, or a file fixed after a --skip-bad run,
therefore rebuilds exactly the shards whose examples it feeds, and their `skipped` lists with them.

Staging: new shards are written to `OUT/.staging/` (with their own `.shard_state/`), never over the shards of
the dataset already in OUT, so a reconversion that fails (a bad example, a full disk, a kill) leaves the previous
dataset readable under its untouched manifest. `write_manifest` commits: it checks every planned shard, removes
the old manifest, moves the staged shards into OUT, deletes shards that the new manifest does not list, and
writes the new manifest last. A kill inside that short commit (renames only) leaves OUT without a manifest,
which readers refuse; the rerun finds the shards in OUT or in staging and finishes. A reconversion needs disk
space for the shards that change while the old ones are still there.

Workers die with their parent: each sets PR_SET_PDEATHSIG (Linux) and watches its parent's pid, so killing a
conversion never leaves processes writing shards behind.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mtl_sparse_jax import fileio
from mtl_sparse_jax.data import spec as data_spec

STATE_DIR = ".shard_state"
STAGING_DIR = ".staging"


class BadExampleError(ValueError):
    """An example cannot be converted. The message names the offending key or file and the fix."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a temp file in the same directory and renames it onto `path` (`fileio.write_bytes`)."""
    fileio.write_bytes(path, data)


def atomic_write_json(path: str, obj: Any) -> None:
    fileio.write_json(path, obj, indent=1, sort_keys=True)


def _state_path(out_dir: str, shard_file: str) -> str:
    return os.path.join(out_dir, STATE_DIR, shard_file + ".json")


def _read_state(out_dir: str, shard_file: str) -> dict | None:
    try:
        with open(_state_path(out_dir, shard_file), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    # compress_level 1: shards are read many times but written once; level 1 keeps writing fast and
    # costs ~10-20% in size over the default on photos.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def serialize_example(example: Mapping[str, Any]) -> bytes:
    """Encodes one validated example as a serialized tf.train.Example (see data_spec.FEATURE_SPECS)."""
    import tensorflow as tf  # noqa: PLC0415  (data_prep may import TensorFlow; the model code may not)

    def bytes_feature(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {data_spec.ID_FEATURE: bytes_feature(example[data_spec.ID_FEATURE].encode("utf-8"))}
    for name, value in example.items():
        if name == data_spec.ID_FEATURE:
            continue
        encoding = data_spec.FEATURE_SPECS[name]["encoding"]
        if encoding == "png":
            features[name] = bytes_feature(_png_bytes(value))
        elif encoding == "raw_f32":
            features[name] = bytes_feature(np.ascontiguousarray(value, dtype="<f4").tobytes())
        else:
            features[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    # deterministic=True sorts the feature map, so that a rebuilt shard is byte-identical to the original.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def _hide_gpus_from_tf() -> None:
    import tensorflow as tf  # noqa: PLC0415

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised in this process
        pass


# --------------------------------------------------------------------------------------------------
# One shard (runs in a worker process)
# --------------------------------------------------------------------------------------------------


def _build_checked(build_example: Callable, key: str, image_size, num_classes, features) -> dict:
    """Builds and validates one example; every failure becomes a BadExampleError naming `key`."""
    try:
        example = build_example(key)
    except BadExampleError:
        raise
    except Exception as e:  # a corrupt file, a missing file, ...: report it against the key
        raise BadExampleError(f"example '{key}': {type(e).__name__}: {e}") from None
    if not isinstance(example, Mapping):
        raise BadExampleError(f"example '{key}': build_example returned {type(example).__name__}, not a dict")
    try:
        data_spec.validate_example(example, image_size=image_size, num_classes=num_classes)
    except ValueError as e:
        raise BadExampleError(f"example '{key}' (id {example.get('id')!r}): {e}") from None
    present = sorted(set(example) - {data_spec.ID_FEATURE})
    if features is not None and present != sorted(features):
        raise BadExampleError(
            f"example '{key}' has features {present} but the split's first example has "
            f"{sorted(features)}; every example of a dataset must have the same features"
        )
    return example


def _write_shard(job: dict) -> dict:
    import tensorflow as tf  # noqa: PLC0415

    _hide_gpus_from_tf()
    out_dir, shard_file = job["out_dir"], job["file"]
    final_path = os.path.join(out_dir, shard_file)
    skipped, count = [], 0
    with fileio.atomic_path(final_path) as tmp_path:
        with tf.io.TFRecordWriter(tmp_path) as writer:
            for key in job["keys"]:
                try:
                    example = _build_checked(
                        job["build_example"], key, job["image_size"], job["num_classes"], job["features"]
                    )
                except BadExampleError as e:
                    if not job["skip_bad"]:
                        raise
                    skipped.append({"key": key, "error": str(e)})
                    continue
                writer.write(serialize_example(example))
                count += 1
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        state = {
            "file": shard_file,
            "keys": list(job["keys"]),
            "num_examples": count,
            "sha256": data_spec.sha256_of_file(tmp_path),
            "bytes": os.path.getsize(tmp_path),
            "skipped": skipped,
            "fingerprint": job["fingerprint"],
            "source": job["source"],
        }
    # The sidecar goes last: a sidecar on disk means its shard is complete.
    atomic_write_json(_state_path(out_dir, shard_file), state)
    return state


def _shard_is_done(out_dir: str, job: dict) -> dict | None:
    """The sidecar of `job`'s shard in `out_dir` when that shard is finished and was built exactly as planned."""
    state = _read_state(out_dir, job["file"])
    if (
        state is None
        or state.get("keys") != list(job["keys"])
        or state.get("fingerprint") != job["fingerprint"]
        or state.get("source") != job["source"]
    ):
        return None
    path = os.path.join(out_dir, job["file"])
    if not os.path.isfile(path) or os.path.getsize(path) != state.get("bytes"):
        return None
    return state


def _remove_shard(directory: str, name: str) -> None:
    for path in (os.path.join(directory, name), _state_path(directory, name)):
        if os.path.exists(path):
            os.remove(path)


def _remove_stale_files(staging_dir: str, out_dir: str, split: str, planned: set[str]) -> None:
    """Removes staged shards of `split` from an earlier plan (another shard size) and leftover temp files.

    Shards in `out_dir` itself belong to the dataset there and are only replaced or removed by the commit in
    `write_manifest`.
    """
    for name in os.listdir(staging_dir):
        match = data_spec.SHARD_NAME_RE.match(name)
        if match is not None and match.group("split") == split and name not in planned:
            _remove_shard(staging_dir, name)
    for directory in (staging_dir, out_dir):
        for name in os.listdir(directory):
            if name.startswith(f".{split}-") and name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))


# --------------------------------------------------------------------------------------------------
# The source fingerprint
# --------------------------------------------------------------------------------------------------


class _SourceStats:
    """One line per source file (path, size, mtime in ns, or 'missing'), with each directory listed once, so
    that the many optional files that do not exist (CelebA's absent part masks) cost no failed stat."""

    def __init__(self) -> None:
        self._names: dict[str, set[str]] = {}

    def line(self, path: str) -> str:
        path = os.path.abspath(os.fspath(path))
        directory, name = os.path.split(path)
        names = self._names.get(directory)
        if names is None:
            try:
                names = set(os.listdir(directory))
            except OSError:  # missing, not a directory, unreadable: then its files are missing too
                names = set()
            self._names[directory] = names
        if name in names:
            try:
                st = os.stat(path)
                return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError:
                pass
        return f"{path}\0missing\n"


def source_digest(paths: Sequence[str], stats: _SourceStats | None = None) -> str:
    """sha256 over (absolute path, size, mtime in ns) of each file, or its absence, in the given order.

    Cheap (one stat per existing file) and enough to notice a fixed, replaced, restored or deleted file, or
    another --src. A file rewritten with the same size within the file system's timestamp granularity is not
    noticed; `overwrite=True` (synthetic --force) rebuilds everything.
    """
    stats = stats or _SourceStats()
    digest = hashlib.sha256()
    for path in paths:
        digest.update(stats.line(path).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _shard_source(keys: Sequence[str], source_files: Callable[[str], Sequence[str]] | None, stats=None) -> str | None:
    if source_files is None:
        return None
    return source_digest([path for key in keys for path in source_files(key)], stats)


# --------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: make sure this process ends when the converter that started it does.

    On Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG); everywhere a daemon thread also
    checks once a second that the parent is still the same process. A parent killed before this point is
    noticed by the first check.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog below still works
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def prepare_out_dir(out_dir: str, flag: str = "--out") -> str:
    """Creates the output directory; refuses a path that is a file with a one-line ValueError."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory; pass a new or existing directory as {flag}")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def staging_dir(out_dir: str) -> str:
    """Where `write_split` builds new shards until `write_manifest` moves them into `out_dir`."""
    return os.path.join(os.fspath(out_dir), STAGING_DIR)


def write_split(
    out_dir: str,
    split: str,
    keys: Sequence[str],
    build_example: Callable[[str], dict],
    *,
    shard_size: int = 256,
    num_workers: int | None = None,
    skip_bad: bool = False,
    image_size: Sequence[int] | None = None,
    desc: str | None = None,
    num_classes: Mapping[str, int] | None = None,
    overwrite: bool = False,
    source_files: Callable[[str], Sequence[str]] | None = None,
) -> dict:
    """Writes the examples of one split as TFRecord shards for `out_dir` and returns its manifest entry.

    keys: ordered example keys (str); shard k holds keys[k*shard_size:(k+1)*shard_size].
    build_example: picklable (top-level function or functools.partial of one); build_example(key) returns a
      dict with 'id' (str), 'image' uint8 [H,W,3] and any of 'seg' uint8 [H,W], 'depth' float32 [H,W] (metres,
      0 = invalid), 'normals' float32 [H,W,3], 'edge' float32 [H,W], 'male'/'smile'/'eyebrows'/'glasses' int in
      {0,1}. Every example must have the same features.
    num_workers: processes building shards (default: CPU count); 0 or 1 builds them in this process.
    skip_bad: skip examples that fail (recorded in the entry's 'skipped') instead of raising BadExampleError.
    image_size: (H, W) every example must have; default: the first good example's size.
    num_classes: e.g. {'seg': 40}; seg labels must then be < 40 or 255 (ignore).
    overwrite: rebuild every shard even if a finished one is on disk.
    source_files: source_files(key) lists the files example `key` is read from, absent ones included (e.g. an
      optional mask); a finished shard is reused only while all of them are unchanged (see `source_digest`).
      None (procedural data) leaves the source out of the fingerprint.

    Shards that must be (re)built go to `staging_dir(out_dir)`; `write_manifest` moves them into `out_dir`.
    Returns {'num_examples', 'shards': [{'file', 'num_examples', 'sha256', 'bytes'}], 'skipped': [{'key',
    'error'}], 'features': [...], 'image_size': [H, W]}.
    """
    out_dir = os.fspath(out_dir)
    keys = [str(k) for k in keys]
    if not keys:
        raise ValueError(f"split '{split}' has no example keys; check the source directory and split files")
    if len(set(keys)) != len(keys):
        raise ValueError(f"split '{split}' has duplicate keys; every example key must be unique")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if not split or "/" in split or not data_spec.SHARD_NAME_RE.match(data_spec.shard_file_name(split, 0, 1)):
        raise ValueError(f"bad split name {split!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory; pass a directory as --out")
    staging = staging_dir(out_dir)
    os.makedirs(os.path.join(staging, STATE_DIR), exist_ok=True)

    image_size, features = _probe_first_example(keys, build_example, image_size, num_classes, skip_bad, split)
    fingerprint = {
        "image_size": list(image_size),
        "features": features,
        "skip_bad": bool(skip_bad),
        "num_classes": dict(num_classes or {}),
    }
    num_shards = -(-len(keys) // shard_size)
    stats = _SourceStats()
    jobs = []
    for index in range(num_shards):
        shard_keys = keys[index * shard_size : (index + 1) * shard_size]
        jobs.append(
            {
                "out_dir": staging,
                "file": data_spec.shard_file_name(split, index, num_shards),
                "keys": shard_keys,
                "build_example": build_example,
                "image_size": tuple(image_size),
                "num_classes": dict(num_classes or {}),
                "features": features,
                "skip_bad": bool(skip_bad),
                "fingerprint": fingerprint,
                "source": _shard_source(shard_keys, source_files, stats),
            }
        )
    _remove_stale_files(staging, out_dir, split, {job["file"] for job in jobs})

    states: dict[str, dict] = {}
    todo = []
    for job in jobs:
        done = None
        if not overwrite:
            # A finished shard of the dataset in OUT, or one staged by an interrupted run.
            done = _shard_is_done(out_dir, job) or _shard_is_done(staging, job)
        if done is not None:
            states[job["file"]] = done
        else:
            _remove_shard(staging, job["file"])
            todo.append(job)

    from tqdm import tqdm  # noqa: PLC0415

    with tqdm(total=len(keys), desc=desc or split, unit="ex", disable=None, file=sys.stderr) as progress:
        progress.update(sum(len(states[f]["keys"]) for f in states))
        workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        workers = min(workers, len(todo))
        if workers <= 1:
            for job in todo:
                states[job["file"]] = _write_shard(job)
                progress.update(len(job["keys"]))
        else:
            # spawn, not fork: the parent may already run TensorFlow threads, which fork does not survive.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                futures = {pool.submit(_write_shard, job): job for job in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        state = future.result()
                        states[state["file"]] = state
                        progress.update(len(futures[future]["keys"]))
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise

    shards, skipped = [], []
    for job in jobs:
        state = states[job["file"]]
        shards.append({k: state[k] for k in ("file", "num_examples", "sha256", "bytes")})
        skipped.extend(state["skipped"])
    return {
        "num_examples": sum(s["num_examples"] for s in shards),
        "shards": shards,
        "skipped": skipped,
        "features": features,
        "image_size": list(image_size),
    }


def _probe_first_example(keys, build_example, image_size, num_classes, skip_bad, split):
    """Builds examples in order until one is valid, to fix the split's feature set and image size."""
    first_error = None
    for key in keys:
        try:
            example = _build_checked(build_example, key, image_size, num_classes, None)
        except BadExampleError as e:
            if not skip_bad:
                raise
            first_error = first_error or e
            continue
        size = tuple(image_size) if image_size is not None else example["image"].shape[:2]
        return [int(s) for s in size], sorted(set(example) - {data_spec.ID_FEATURE})
    raise BadExampleError(f"split '{split}': no example could be built; the first error was: {first_error}")


def _staged_copy(staging: str, shard: Mapping[str, Any]) -> bool:
    """Whether `staging` holds a finished shard with exactly this manifest entry's content."""
    state = _read_state(staging, shard["file"])
    path = os.path.join(staging, shard["file"])
    return (
        state is not None
        and state.get("sha256") == shard["sha256"]
        and state.get("bytes") == shard["bytes"]
        and os.path.isfile(path)
        and os.path.getsize(path) == shard["bytes"]
    )


def _commit(out_dir: str, manifest: dict) -> None:
    """Moves the staged shards into `out_dir` and deletes the shards that `manifest` does not list.

    Everything is checked first, so that a missing shard stops the commit before the old dataset is touched.
    """
    staging = staging_dir(out_dir)
    listed = {shard["file"]: shard for entry in manifest["splits"].values() for shard in entry["shards"]}
    moves = []
    for name, shard in listed.items():
        if os.path.isdir(staging) and _staged_copy(staging, shard):
            moves.append(name)
            continue
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            raise data_spec.DataError(
                f"shard {name} is neither finished in {staging} nor in {out_dir}; rerun the converter "
                "with the same --out"
            )
    stale = [n for n in os.listdir(out_dir) if data_spec.SHARD_NAME_RE.match(n) and n not in listed]
    if moves or stale:
        # From here until the new manifest is in place the directory holds no finished dataset.
        # The tfds metadata describes the old shards too; the converter writes it again after the manifest.
        for name in (data_spec.MANIFEST_NAME, "dataset_info.json", "features.json"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    for name in moves:
        # The old sidecar goes first: a sidecar must never describe another file than the one beside it.
        if os.path.exists(_state_path(out_dir, name)):
            os.remove(_state_path(out_dir, name))
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        os.replace(_state_path(staging, name), _state_path(out_dir, name))
    for name in stale:
        _remove_shard(out_dir, name)


def write_manifest(
    out_dir: str,
    *,
    dataset: str,
    source_layout: str,
    image_size: Sequence[int],
    features: Sequence[str],
    num_classes: Mapping[str, int],
    splits: Mapping[str, dict],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Commits the staged shards and writes DATA_DIR/manifest.json atomically, after checking it on disk.

    features: the feature names present (the image is added if absent); splits: {split: write_split(...)}.
    Returns the manifest's path.
    """
    out_dir = os.fspath(out_dir)
    image_size = [int(s) for s in image_size]
    features = sorted(set(features) | {"image"})
    for split, entry in splits.items():
        for key in ("features", "image_size"):
            if key in entry:
                got = sorted(set(entry[key]) | {"image"}) if key == "features" else list(entry[key])
                want = features if key == "features" else image_size
                if got != want:
                    raise ValueError(f"split '{split}' was written with {key} {got}, but the manifest says {want}")
    manifest = {
        "format": data_spec.FORMAT_NAME,
        "format_version": data_spec.FORMAT_VERSION,
        "dataset": str(dataset),
        "source_layout": str(source_layout),
        "image_size": image_size,
        "features": features,
        "feature_spec": data_spec.feature_spec_for_manifest(features, image_size),
        "num_classes": {str(k): int(v) for k, v in (num_classes or {}).items()},
        "splits": {
            split: {
                "num_examples": int(entry["num_examples"]),
                "shards": [dict(s) for s in entry["shards"]],
                "skipped": list(entry.get("skipped", [])),
            }
            for split, entry in splits.items()
        },
        "extra": dict(extra or {}),
    }
    path = os.path.join(out_dir, data_spec.MANIFEST_NAME)
    data_spec.validate_manifest(manifest, path)
    _commit(out_dir, manifest)
    for split in manifest["splits"]:
        data_spec.verify_split_shards(out_dir, manifest, split, verify="size")
    atomic_write_json(path, manifest)
    shutil.rmtree(staging_dir(out_dir), ignore_errors=True)
    return path
