"""Shared shard writer for every dataset converter: TFRecord shards, resumable, parallel, atomic, checksummed.

A converter lists its example keys per split and gives a picklable `build_example(key) -> dict` that loads
one example (already resized to the dataset's image size). `write_split` validates every example against
`mtl_sparse_jax.data.spec`, writes the split's shards in worker processes and returns the split's manifest
entry; `write_manifest` then writes `manifest.json`, last, so that a directory with a manifest always holds
a finished conversion.

Resumability: shard k of n is written to a temporary file and renamed into place, and only then is a small
sidecar `.shard_state/<shard>.json` (its keys, count, sha256, bytes, skipped keys) renamed into place. A rerun
skips every shard whose sidecar matches the planned keys and whose file has the recorded size, so a
conversion killed at any moment resumes where it stopped and never reads back a half-written shard.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import sys
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mtl_sparse_jax.data import spec as data_spec

STATE_DIR = ".shard_state"


class BadExampleError(ValueError):
    """An example cannot be converted. The message names the offending key or file and the fix."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _new_file_mode() -> int:
    """The mode open() would give a new file (0666 minus the umask); mkstemp alone would give 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a temp file in the same directory and renames it onto `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


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
    fd, tmp_path = tempfile.mkstemp(prefix="." + shard_file + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    skipped, count = [], 0
    try:
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
        }
        os.chmod(tmp_path, _new_file_mode())
        os.replace(tmp_path, final_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    # The sidecar goes last: a sidecar on disk means its shard is complete.
    atomic_write_json(_state_path(out_dir, shard_file), state)
    return state


def _shard_is_done(out_dir: str, shard_file: str, keys: Sequence[str], fingerprint: dict) -> dict | None:
    state = _read_state(out_dir, shard_file)
    if state is None or state.get("keys") != list(keys) or state.get("fingerprint") != fingerprint:
        return None
    path = os.path.join(out_dir, shard_file)
    if not os.path.isfile(path) or os.path.getsize(path) != state.get("bytes"):
        return None
    return state


def _remove_stale_files(out_dir: str, split: str, planned: set[str]) -> None:
    """Removes shards of `split` from an earlier plan (another shard size) and leftover temp files."""
    for name in os.listdir(out_dir):
        match = data_spec.SHARD_NAME_RE.match(name)
        is_old_shard = match is not None and match.group("split") == split and name not in planned
        is_temp = name.startswith(f".{split}-") and name.endswith(".tmp")
        if is_old_shard or is_temp:
            os.remove(os.path.join(out_dir, name))
            state = _state_path(out_dir, name)
            if os.path.exists(state):
                os.remove(state)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


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
) -> dict:
    """Writes the examples of one split as TFRecord shards in `out_dir` and returns its manifest entry.

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
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    # A finished manifest would describe the shards about to be replaced: remove it first so that no
    # reader can pair it with a half-rewritten directory. write_manifest writes it again at the end.
    manifest_path = os.path.join(out_dir, data_spec.MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)

    image_size, features = _probe_first_example(keys, build_example, image_size, num_classes, skip_bad, split)
    fingerprint = {
        "image_size": list(image_size),
        "features": features,
        "skip_bad": bool(skip_bad),
        "num_classes": dict(num_classes or {}),
    }
    num_shards = -(-len(keys) // shard_size)
    jobs = []
    for index in range(num_shards):
        jobs.append(
            {
                "out_dir": out_dir,
                "file": data_spec.shard_file_name(split, index, num_shards),
                "keys": keys[index * shard_size : (index + 1) * shard_size],
                "build_example": build_example,
                "image_size": tuple(image_size),
                "num_classes": dict(num_classes or {}),
                "features": features,
                "skip_bad": bool(skip_bad),
                "fingerprint": fingerprint,
            }
        )
    _remove_stale_files(out_dir, split, {job["file"] for job in jobs})

    states: dict[str, dict] = {}
    todo = []
    for job in jobs:
        done = None if overwrite else _shard_is_done(out_dir, job["file"], job["keys"], fingerprint)
        if done is not None:
            states[job["file"]] = done
        else:
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
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_write_shard, job): job for job in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        state = future.result()
                        states[state["file"]] = state
                        progress.update(len(futures[future]["keys"]))
                except BaseException:
                    for future in futures:
                        future.cancel()
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
    """Writes DATA_DIR/manifest.json atomically, after checking it against the shards on disk.

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
    for split in manifest["splits"]:
        data_spec.verify_split_shards(out_dir, manifest, split, verify="size")
    atomic_write_json(path, manifest)
    return path
