"""Device-resident datasets: a split decoded once into `.npy` arrays next to its shards, kept on the accelerator,
and each batch gathered there by index. Training from existing arrays needs neither TensorFlow nor protobuf.

    for batch in device.iterate_batches(data_dir, "train", tasks=("seg", "depth"), batch_size=16, train=True,
                                        seed=0, epoch=3, sharding=NamedSharding(mesh, P("data"))):
        ...  # dict of global jax.Arrays, batch axis sharded over the mesh axis 'data'

Batches have the keys, dtypes and shapes of `pipeline.iterate_batches` (the batch contract in its docstring), as
global `jax.Array`s of the global batch (`batch_size` per process × process count), placed with `sharding`.
With `with_ids=True`, 'id' is this process's part of the batch as a host numpy bytes array (b'' for padding).

Order: exactly that of the tf.data loader's in-memory mode (splits whose shards total < 1 GiB). Training: one
permutation of the split drawn from (seed, epoch) alone, cut into global batches, one block per process
(`pipeline.example_order`), remainder dropped;
so a run resumed at an epoch boundary sees the same batches. Evaluation: manifest order, example i to process
i mod P, the last batch padded with weight-0 examples (seg 255, everything else 0). The tf.data loader streams
larger splits with a shuffle buffer instead, so its training order differs there (both are deterministic).

On disk (`DATA_DIR/arrays/` and `DATA_DIR/arrays.json`; `manifest.json` is left alone)::

    arrays/<split>.image.npy    uint8   [N,H,W,3]
    arrays/<split>.seg.npy      uint8   [N,H,W]
    arrays/<split>.depth.npy    float32 [N,H,W,1]   metres as stored in the shards, 0 = invalid
    arrays/<split>.normals.npy  float32 [N,H,W,3]
    arrays/<split>.edge.npy     float32 [N,H,W,1]
    arrays/<split>.<attr>.npy   uint8   [N]
    arrays/<split>.id.npy       bytes   [N]         fixed-width 'S' dtype, no pickle
    arrays.json                 per split: the shards' sha256 they were decoded from, and per array its file,
                                sha256, byte size, dtype and shape

The arrays are written on first use (decoding the shards needs TensorFlow, once) or ahead of time with
`python -m mtl_sparse_jax.data.device DATA_DIR`. Every file is written to a temporary name and renamed, and a
lock file serialises writers. Loading checks each file's size and sha256 against arrays.json and reads it with
`np.load(allow_pickle=False)`; any mismatch is a one-line DataError naming the file. Depth normalisation
(`depth_norm`) is applied in numpy at load time (float64, the same arithmetic as the tf.data decoder), so one
set of files serves every normalisation.

Resident dtypes: images and labels uint8, valid masks uint8, depth / normals / edges float32 by default
(`float_dtype='float16'` halves them; its error against float32 is in BENCHMARKS.md). The float32 default keeps
the batches bit-identical to the tf.data loader's; a 256² NYU-v2 train split (795 images, image + seg + depth +
normals) is ~1.1 GB on the device in float32.

Processes: every process loads the whole split and keeps one copy on each of its local devices (the tables
are replicated over the mesh); each device gathers only its slice of the global batch, so a step moves no
example between devices or hosts. A per-process share would not work for training: the per-epoch permutation
sends every example to every process over the epochs. So the split must fit in one device's memory, next to
the model; `iterate_batches` refuses a split above `MAX_DEVICE_FRACTION` of a device's memory limit, and the
tf.data loader (`data.loader='tfdata'`) streams such splits instead.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_sparse_jax.data import spec as data_spec
from mtl_sparse_jax.data.spec import DataError

ARRAYS_NAME = "arrays.json"
ARRAYS_DIR = "arrays"
ARRAYS_FORMAT = "mtl-sparse-jax-arrays"
ARRAYS_FORMAT_VERSION = 1
DEPTH_NORMS = ("reference", "fixed", "none")
FLOAT_DTYPES = ("float32", "float16")
MAX_DEVICE_FRACTION = 0.5  # of a device's memory limit, leaving the rest to the model, activations, optimizer
_CACHE: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
_CACHE_ENTRIES = 4  # train, val and test of one dataset, plus one spare
_FLOAT_KEYS = ("depth", "normals", "edge")
_PAD = {"seg": data_spec.IGNORE_LABEL}
_IMAGE_LUT = np.arange(256, dtype=np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------------------
# arrays.json
# --------------------------------------------------------------------------------------------------


def _sidecar_path(data_dir: str) -> str:
    return os.path.join(data_dir, ARRAYS_NAME)


def _read_sidecar(data_dir: str) -> dict:
    path = _sidecar_path(data_dir)
    if not os.path.exists(path):
        return {"format": ARRAYS_FORMAT, "format_version": ARRAYS_FORMAT_VERSION, "splits": {}}
    try:
        with open(path, encoding="utf-8") as f:
            sidecar = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); delete it and {ARRAYS_DIR}/ to decode again") from None
    if (
        not isinstance(sidecar, dict)
        or sidecar.get("format") != ARRAYS_FORMAT
        or sidecar.get("format_version") != ARRAYS_FORMAT_VERSION
        or not isinstance(sidecar.get("splits"), dict)
    ):
        raise DataError(
            f"{path} is not an {ARRAYS_FORMAT} v{ARRAYS_FORMAT_VERSION} file; delete it and {ARRAYS_DIR}/ "
            f"to decode again"
        )
    return sidecar


def _write_atomic_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_signature(entry: dict) -> list:
    return [[shard["file"], shard["sha256"]] for shard in entry["shards"]]


@contextlib.contextmanager
def _writer_lock(data_dir: str):
    """One writer per data directory at a time (processes on one host or on a filesystem with flock)."""
    import fcntl  # noqa: PLC0415  (POSIX only; only writers need it)

    try:
        f = open(os.path.join(data_dir, ARRAYS_NAME + ".lock"), "w")  # noqa: SIM115  (closed below)
    except OSError as e:
        raise DataError(
            f"cannot write the device loader's arrays into {data_dir} ({e.strerror}); make it writable, or run "
            f"python -m mtl_sparse_jax.data.device on a writable copy, or use --config.data.loader=tfdata"
        ) from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Decoding the shards (TensorFlow, once per split)
# --------------------------------------------------------------------------------------------------


def prepare_split(data_dir: str, split: str) -> dict:
    """Decodes every feature of `split` from its shards into arrays/ and records them in arrays.json.

    Returns the split's arrays.json entry. Does nothing when the recorded arrays match the current shards.
    Needs TensorFlow (the tf.data decoder of `pipeline`, so the values are the tf.data loader's).
    """
    data_dir = os.fspath(data_dir)
    manifest = data_spec.load_manifest(data_dir, verify="none")
    entry = data_spec.split_entry(manifest, split, data_dir)
    with _writer_lock(data_dir):
        sidecar = _read_sidecar(data_dir)
        current = sidecar["splits"].get(split)
        if current is not None and current.get("shards") == _shard_signature(entry):
            return current
        record = _decode_split(data_dir, manifest, split, entry)
        sidecar = _read_sidecar(data_dir)  # re-read under the lock: another split may have been added
        sidecar["splits"][split] = record
        _write_atomic_json(_sidecar_path(data_dir), sidecar)
        return record


def _decode_split(data_dir: str, manifest: dict, split: str, entry: dict) -> dict:
    try:
        from mtl_sparse_jax.data import pipeline  # noqa: PLC0415

        tf = pipeline.tf_module()
    except ImportError:
        raise DataError(
            f"{_sidecar_path(data_dir)} has no arrays for split '{split}' matching its shards, and decoding the "
            f"shards needs TensorFlow, which is not installed here; run python -m mtl_sparse_jax.data.device "
            f"{data_dir} on a machine with TensorFlow and bring {ARRAYS_DIR}/ and {ARRAYS_NAME} along, or use "
            f"--config.data.loader=tfdata"
        ) from None
    data_spec.verify_split_shards(data_dir, manifest, split, verify="size")
    features = list(manifest["features"])
    height, width = manifest["image_size"]
    n = entry["num_examples"]
    decode = pipeline.make_decoder(features, (height, width), "none", 1.0, True)
    files = [os.path.join(data_dir, shard["file"]) for shard in entry["shards"]]
    ds = pipeline.record_dataset(files, shuffle_seed=None, interleave=False)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(64)
    out_dir = os.path.join(data_dir, ARRAYS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    shapes = {"image": (height, width, 3), "seg": (height, width), "depth": (height, width, 1)}
    shapes.update({"normals": (height, width, 3), "edge": (height, width, 1)})
    dtypes = {"image": np.uint8, "seg": np.uint8, "depth": np.float32, "normals": np.float32, "edge": np.float32}
    tmp_paths, maps, ids = {}, {}, []
    suffix = f".tmp.{os.getpid()}.npy"
    try:
        for name in features:
            tmp_paths[name] = os.path.join(out_dir, f"{split}.{name}{suffix}")
            maps[name] = np.lib.format.open_memmap(
                tmp_paths[name], mode="w+", dtype=dtypes.get(name, np.uint8), shape=(n, *shapes.get(name, ()))
            )
        row = 0
        try:
            for batch in ds.as_numpy_iterator():
                size = len(batch["id"])
                for name in features:
                    maps[name][row : row + size] = batch[name]
                ids.extend(batch["id"])
                row += size
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise pipeline.corruption_error(data_dir, manifest, split, e) from None
        if row != n:
            raise DataError(
                f"split '{split}' of {data_dir}: the shards hold {row} examples but {data_spec.MANIFEST_NAME} "
                f"says {n}; rerun the converter into an empty directory"
            )
        for name in features:
            maps[name].flush()
        del maps
        id_path = os.path.join(out_dir, f"{split}.id{suffix}")
        tmp_paths["id"] = id_path
        np.save(id_path, np.array(ids, dtype=f"S{max([1] + [len(i) for i in ids])}"), allow_pickle=False)
        arrays = {name: _publish(data_dir, split, name, tmp) for name, tmp in tmp_paths.items()}
    finally:
        for tmp in tmp_paths.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return {"num_examples": n, "shards": _shard_signature(entry), "arrays": arrays}


def _publish(data_dir: str, split: str, name: str, tmp: str) -> dict:
    """Renames a finished temporary .npy into place; returns its arrays.json record."""
    final = os.path.join(data_dir, ARRAYS_DIR, f"{split}.{name}.npy")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    header = np.load(final, mmap_mode="r", allow_pickle=False)
    record = {
        "file": f"{ARRAYS_DIR}/{split}.{name}.npy",
        "sha256": data_spec.sha256_of_file(final),
        "bytes": os.path.getsize(final),
        "dtype": header.dtype.str,
        "shape": list(header.shape),
    }
    del header
    return record


def write_arrays(data_dir: str, split: str, arrays: dict[str, np.ndarray]) -> dict:
    """Writes a split held in memory as the device loader's files and records them against the current shards.

    For code that has the decoded examples already (a converter, a benchmark): no TFRecord parsing. `arrays`
    holds every feature of the manifest in the on-disk dtypes and shapes of the module docstring, plus 'id'
    (bytes, 'S' dtype), in manifest order. Returns the split's arrays.json entry.
    """
    data_dir = os.fspath(data_dir)
    manifest = data_spec.load_manifest(data_dir, verify="none")
    entry = data_spec.split_entry(manifest, split, data_dir)
    height, width = manifest["image_size"]
    n = entry["num_examples"]
    expected = {"id": None}
    for name in manifest["features"]:
        shape = {"image": (height, width, 3), "seg": (height, width), "normals": (height, width, 3)}.get(name)
        shape = shape or ((height, width, 1) if name in ("depth", "edge") else ())
        dtype = np.float32 if name in _FLOAT_KEYS else np.uint8
        expected[name] = (np.dtype(dtype), (n, *shape))
    if set(arrays) != set(expected):
        raise ValueError(f"write_arrays needs exactly the keys {sorted(expected)}, got {sorted(arrays)}")
    for name, want in expected.items():
        value = np.asarray(arrays[name])
        ok = value.dtype.kind == "S" and value.shape == (n,) if want is None else (value.dtype, value.shape) == want
        if not ok:
            raise ValueError(f"array '{name}' is {value.dtype} {list(value.shape)}, expected {want or ('bytes', (n,))}")
    os.makedirs(os.path.join(data_dir, ARRAYS_DIR), exist_ok=True)
    with _writer_lock(data_dir):
        records = {}
        for name, value in arrays.items():
            tmp = os.path.join(data_dir, ARRAYS_DIR, f"{split}.{name}.tmp.{os.getpid()}.npy")
            try:
                np.save(tmp, np.asarray(value), allow_pickle=False)
                records[name] = _publish(data_dir, split, name, tmp)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        record = {"num_examples": n, "shards": _shard_signature(entry), "arrays": records}
        sidecar = _read_sidecar(data_dir)
        sidecar["splits"][split] = record
        _write_atomic_json(_sidecar_path(data_dir), sidecar)
    return record


# --------------------------------------------------------------------------------------------------
# Loading (numpy only)
# --------------------------------------------------------------------------------------------------


def _split_record(data_dir: str, manifest: dict, split: str, convert: bool) -> dict:
    entry = data_spec.split_entry(manifest, split, data_dir)
    record = _read_sidecar(data_dir)["splits"].get(split)
    if record is None or record.get("shards") != _shard_signature(entry):
        if not convert:
            raise DataError(
                f"{_sidecar_path(data_dir)} has no arrays for split '{split}' matching its shards; run "
                f"python -m mtl_sparse_jax.data.device {data_dir} (needs TensorFlow)"
            )
        record = prepare_split(data_dir, split)
    return record


def load_array(data_dir: str, info: dict) -> np.ndarray:
    """One recorded array, checked against its size, sha256, dtype and shape; never unpickles."""
    path = os.path.join(data_dir, info["file"])
    fix = f"delete it and the split's entry in {_sidecar_path(data_dir)} and run python -m mtl_sparse_jax.data.device"
    if not os.path.isfile(path):
        raise DataError(f"array {path} listed in {ARRAYS_NAME} is missing; {fix} {data_dir}")
    size = os.path.getsize(path)
    if size != info["bytes"]:
        raise DataError(f"array {path} is {size} bytes but {ARRAYS_NAME} says {info['bytes']} (truncated); {fix}")
    if data_spec.sha256_of_file(path) != info["sha256"]:
        raise DataError(f"array {path} fails its sha256 checksum in {ARRAYS_NAME} (corrupted); {fix}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which is refused; also a bad .npy header
        raise DataError(f"array {path} cannot be read without pickle ({str(e).splitlines()[0]}); {fix}") from None
    if array.dtype.str != info["dtype"] or list(array.shape) != info["shape"]:
        raise DataError(
            f"array {path} is {array.dtype.str} {list(array.shape)} but {ARRAYS_NAME} says {info['dtype']} "
            f"{info['shape']}; {fix}"
        )
    return array


def _percentile_99(sorted_rows: np.ndarray) -> np.ndarray:
    """np.percentile(row, 99, method='linear') of each ascending float64 row (numpy's formula, vectorised)."""
    n = sorted_rows.shape[1]
    quantile = 0.99
    virtual = n * quantile + (1.0 + quantile * (1.0 - 1.0 - 1.0)) - 1.0
    previous = np.floor(virtual)
    gamma = virtual - previous
    lo = int(np.clip(previous, 0, n - 1))
    hi = int(np.clip(previous + 1, 0, n - 1))
    a, b = sorted_rows[:, lo], sorted_rows[:, hi]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)


def normalise_depth(depth: np.ndarray, depth_norm: str, depth_max_m: float):
    """depth float32 [N,H,W,1] metres -> (normalised float32, valid uint8 [N,H,W,1], scale float32 [N]).

    The arithmetic of the tf.data decoder (float64, then float32), so both loaders give the same values.
    """
    n = depth.shape[0]
    valid = ((depth > 0) & np.isfinite(depth)).astype(np.uint8)
    d = depth.astype(np.float64)
    if depth_norm == "reference":
        maximum = d.reshape(n, -1).max(axis=1)
        scale = np.where(maximum > 0, maximum, 1.0)
        divided = d / scale[:, None, None, None]
        p99 = _percentile_99(np.sort(divided.reshape(n, -1), axis=1))
        normalised = np.minimum(np.maximum(divided, 0.1), p99[:, None, None, None])
    elif depth_norm == "fixed":
        scale = np.full(n, float(depth_max_m))
        normalised = np.clip(d / float(depth_max_m), 0.0, 1.0)
    else:
        scale = np.ones(n)
        normalised = d
    return normalised.astype(np.float32), valid, scale.astype(np.float32)


def _host_tables(data_dir, record, split, features, depth_norm, depth_max_m, float_dtype, with_ids):
    """The compact host arrays of the batch keys `features` need (plus ids), in manifest order."""
    arrays = record["arrays"]
    tables = {}
    for name in features:
        if name not in arrays:
            raise DataError(
                f"{_sidecar_path(data_dir)} lacks feature '{name}' for split '{split}'; delete the file and "
                f"{ARRAYS_DIR}/ and run python -m mtl_sparse_jax.data.device {data_dir}"
            )
        value = load_array(data_dir, arrays[name])
        if name == "depth":
            depth, valid, scale = normalise_depth(value, depth_norm, depth_max_m)
            tables["depth"], tables["depth_valid"], tables["depth_scale"] = depth, valid, scale
        else:
            tables[name] = value
    for key in _FLOAT_KEYS:
        if key in tables:
            tables[key] = tables[key].astype(float_dtype)
    ids = load_array(data_dir, arrays["id"]) if with_ids else None
    return tables, ids


_BYTES_PER_PIXEL = {"image": 3, "seg": 1, "depth": 4 + 1, "normals": 12, "edge": 4}  # float32; depth + valid


def resident_bytes(data_dir: str, split: str, tasks, float_dtype: str = "float32") -> int:
    """Bytes one device holds for `split` and `tasks`, from the manifest alone (nothing is decoded)."""
    manifest = data_spec.load_manifest(data_dir, verify="none")
    n = data_spec.split_entry(manifest, split, data_dir)["num_examples"]
    height, width = manifest["image_size"]
    total = 0
    for name in data_spec.features_for_tasks(manifest, list(tasks), data_dir):
        per_pixel = _BYTES_PER_PIXEL.get(name)
        if per_pixel is None:  # an attribute: one byte per example
            total += n
            continue
        if float_dtype == "float16" and name in _FLOAT_KEYS:
            per_pixel = {"depth": 2 + 1, "normals": 6, "edge": 2}[name]
        total += n * height * width * per_pixel + (4 * n if name == "depth" else 0)
    return total


def _device_limit(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (not every backend reports memory)
        stats = None
    return (stats or {}).get("bytes_limit")


def fits(data_dir: str, split: str, tasks, mesh, float_dtype: str = "float32") -> bool:
    """Whether `split` fits within MAX_DEVICE_FRACTION of every local device of `mesh` (True where a backend,
    like the CPU, reports no limit)."""
    need = resident_bytes(data_dir, split, tasks, float_dtype)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return all(not _device_limit(d) or need <= MAX_DEVICE_FRACTION * _device_limit(d) for d in local)


def _check_fits(total_bytes: int, devices) -> None:
    for device in devices:
        limit = _device_limit(device)
        if limit and total_bytes > MAX_DEVICE_FRACTION * limit:
            raise DataError(
                f"the split needs {total_bytes / 2**30:.2f} GiB on every device, more than "
                f"{MAX_DEVICE_FRACTION:.0%} of {device}'s {limit / 2**30:.1f} GiB; use "
                f"--config.data.loader=tfdata, which streams it"
            )


def _device_tables(data_dir, manifest, split, features, depth_norm, depth_max_m, float_dtype, with_ids, mesh):
    """The split's tables replicated over `mesh` (cached per process), plus the host ids."""
    record = _split_record(data_dir, manifest, split, convert=True)
    key = (
        os.path.abspath(data_dir),
        split,
        tuple(features),
        depth_norm,
        float(depth_max_m),
        float_dtype,
        with_ids,
        tuple(d.id for d in mesh.devices.flat),
        json.dumps(record["arrays"], sort_keys=True),
    )
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    tables, ids = _host_tables(data_dir, record, split, features, depth_norm, depth_max_m, float_dtype, with_ids)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    _check_fits(sum(t.nbytes for t in tables.values()), local)
    replicated = NamedSharding(mesh, P())
    placed = {
        name: jax.make_array_from_callback(table.shape, replicated, lambda index, t=table: t[index])
        for name, table in tables.items()
    }
    value = {"tables": placed, "ids": ids}
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return value


# --------------------------------------------------------------------------------------------------
# The gather on the device
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _gather_fn(sharding: NamedSharding):
    """jit(tables, index matrix [steps, B], step) -> the batch of that step, finalised, placed with `sharding`."""

    def gather(tables, index_matrix, step):
        indices = jax.lax.dynamic_index_in_dim(index_matrix, step, axis=0, keepdims=False)
        present = indices >= 0
        safe = jnp.maximum(indices, 0)
        out = {}
        for name, table in tables.items():
            values = jnp.take(table, safe, axis=0)
            mask = present.reshape((-1,) + (1,) * (table.ndim - 1))
            values = jnp.where(mask, values, jnp.asarray(_PAD.get(name, 0), table.dtype))
            if name == "image":
                # A lookup table of the correctly rounded uint8 / 255 (float32), computed by numpy: XLA rewrites a
                # division by a constant into a multiplication by its reciprocal, which is off by one ulp for half
                # of the values, and batches are meant to equal the tf.data loader's bit for bit.
                values = jnp.take(jnp.asarray(_IMAGE_LUT), values.astype(jnp.int32), axis=0)
            elif name == "seg":
                values = values.astype(jnp.int32)
            else:
                values = values.astype(jnp.float32)
            out[name] = values
        out["weight"] = present.astype(jnp.float32)
        return out

    return jax.jit(gather, out_shardings=sharding)


def _check_sharding(sharding) -> None:
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) < 1 or sharding.spec[0] != "data":
        raise ValueError(f"sharding must be a NamedSharding with PartitionSpec('data', ...), got {sharding!r}")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def iterate_batches(
    data_dir: str,
    split: str,
    *,
    tasks,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    depth_norm: str = "reference",
    depth_max_m: float = 10.0,
    process_index: int | None = None,
    process_count: int | None = None,
    cache: bool | None = None,
    prefetch: int = 2,
    with_ids: bool = False,
    verify: str = "size",
    sharding: NamedSharding,
    float_dtype: str = "float32",
) -> Iterator[dict]:
    """One epoch of `split` as dicts of global jax.Arrays placed with `sharding` (see the module docstring).

    The arguments of `pipeline.iterate_batches`, with the same meaning; batch_size is the per-process batch.
    `cache` and `prefetch` are accepted for the same call signature: the split is always resident and batches
    are gathered when asked for. `verify` applies to the shards when they must be decoded; the arrays are always
    checked against their sha256 when first loaded in a process. Argument and data errors are raised here,
    not at the first batch.
    """
    del cache, prefetch
    if depth_norm not in DEPTH_NORMS:
        raise ValueError(f"depth_norm must be one of {DEPTH_NORMS}, got {depth_norm!r}")
    if not depth_max_m > 0:
        raise ValueError(f"depth_max_m must be positive, got {depth_max_m}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    _check_sharding(sharding)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")

    data_dir = os.fspath(data_dir)
    manifest = data_spec.load_manifest(data_dir, verify="none")
    entry = data_spec.split_entry(manifest, split, data_dir)
    features = data_spec.features_for_tasks(manifest, list(tasks), data_dir)
    num_total = entry["num_examples"]
    steps = data_spec.steps_for(num_total, batch_size, train=train, process_count=process_count)
    if steps == 0:
        raise DataError(
            f"split '{split}' of {data_dir} has {num_total} examples, fewer than one batch of "
            f"{batch_size} per process for {process_count} process(es); lower the batch size"
        )
    record = _read_sidecar(data_dir)["splits"].get(split)
    if verify != "none" and (record is None or record.get("shards") != _shard_signature(entry)):
        data_spec.verify_split_shards(data_dir, manifest, split, verify=verify)
    resident = _device_tables(
        data_dir, manifest, split, features, depth_norm, depth_max_m, float_dtype, with_ids, sharding.mesh
    )
    from mtl_sparse_jax.data import pipeline  # noqa: PLC0415  (imports TensorFlow only lazily, and not here)

    local_indices = pipeline.example_order(
        num_total,
        train=train,
        seed=seed,
        epoch=epoch,
        steps=steps,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    ).astype(np.int32)
    index_sharding = NamedSharding(sharding.mesh, P(None, "data"))
    index_matrix = jax.make_array_from_process_local_data(index_sharding, local_indices)
    return _batches(resident, index_matrix, local_indices, steps, sharding)


def _batches(resident, index_matrix, local_indices, steps, sharding) -> Iterator[dict]:
    gather = _gather_fn(sharding)
    ids = resident["ids"]
    for step in range(steps):
        batch = gather(resident["tables"], index_matrix, np.int32(step))
        if ids is not None:
            row = local_indices[step]
            batch["id"] = np.where(row >= 0, ids[np.maximum(row, 0)], np.array(b"", dtype=ids.dtype))
        yield batch


def clear_cache() -> None:
    """Drops this process's device-resident splits (frees their device memory once no batch refers to them)."""
    _CACHE.clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Decode a shard directory's splits into the .npy arrays of the device loader (needs TensorFlow)."
    )
    parser.add_argument("data_dir")
    parser.add_argument("--splits", default="", help="comma-separated splits; default: every split in the manifest")
    args = parser.parse_args(argv)
    try:
        manifest = data_spec.load_manifest(args.data_dir, verify="size")
        splits = [s for s in args.splits.split(",") if s] or list(manifest["splits"])
        for split in splits:
            record = prepare_split(args.data_dir, split)
            total = sum(a["bytes"] for a in record["arrays"].values())
            print(f"{split}: {record['num_examples']} examples, {total / 2**20:.1f} MiB in {ARRAYS_DIR}/", flush=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
