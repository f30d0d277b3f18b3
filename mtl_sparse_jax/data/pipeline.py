"""tf.data input pipeline: TFRecord shards + manifest.json -> per-process numpy batches for the trainer.

This is the only module of `mtl_sparse_jax` that imports TensorFlow (with `tfds_source`, which reads tfds
dataset directories through it: `data_format='tfds'`), and it does so lazily, hiding every GPU from TF first so
that TF never takes accelerator memory from JAX.

Batches (docs/architecture.md): `image` float32 [B,H,W,3] in [0,1]; `seg` int32 [B,H,W] (255 = ignore);
`depth` float32 [B,H,W,1] normalised per `depth_norm`, `depth_valid` float32 [B,H,W,1], `depth_scale`
float32 [B] (metres per unit); `normals` float32 [B,H,W,3]; `edge` float32 [B,H,W,1]; attributes float32
[B]; `weight` float32 [B] (0 for padding). Only the features the requested tasks need are decoded.

Order and sharding. Example i of a split (in manifest order) belongs to process i mod P in evaluation.
In training, one permutation of all examples, drawn from (seed, epoch) alone, is cut into global batches and
each global batch into one block per process, so the processes see disjoint examples, the global batch of a
step does not depend on the number of processes, and a run resumed at an epoch boundary sees the same order
as an uninterrupted one. Small splits are decoded once and cached in memory (the permutation is then
exact); large splits are streamed with a seeded file shuffle and a seeded shuffle buffer, which is
deterministic too but not a uniform permutation.
"""

from __future__ import annotations

import collections
import os
from typing import Iterator

import numpy as np

from mtl_sparse_jax.data import spec as data_spec
from mtl_sparse_jax.data.spec import DataError

DEPTH_NORMS = ("reference", "fixed", "none")
DATA_FORMATS = ("shards", "tfds")  # our TFRecord shards + manifest.json | a tfds dataset directory (tfds_source)
AUTO_CACHE_MAX_BYTES = 1 << 30  # splits whose shards are smaller are decoded once and kept in memory
STREAM_SHUFFLE_BUFFER = 2048
DECODED_CACHE: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
DECODED_CACHE_ENTRIES = 4  # train, val and test of one dataset, plus one spare

_tf_module = None


def tf_module():
    """Imports TensorFlow on first use, with all GPUs hidden from it."""
    global _tf_module
    if _tf_module is None:
        import tensorflow as tf  # noqa: PLC0415

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF was initialised elsewhere first; nothing more can be done here
            pass
        _tf_module = tf
    return _tf_module


# --------------------------------------------------------------------------------------------------
# Public helpers on the manifest
# --------------------------------------------------------------------------------------------------


def num_examples(data_dir: str, split: str, *, data_format: str = "shards") -> int:
    if data_format == "tfds":
        from mtl_sparse_jax.data import tfds_source  # noqa: PLC0415

        return tfds_source.num_examples(data_dir, split)
    manifest = data_spec.load_manifest(data_dir, verify="none")
    return data_spec.split_entry(manifest, split, data_dir)["num_examples"]


def steps_per_epoch(
    data_dir: str, split: str, batch_size: int, *, train: bool, process_count: int = 1, data_format: str = "shards"
) -> int:
    """Batches each process yields per epoch (the same on every process)."""
    total = num_examples(data_dir, split, data_format=data_format)
    return data_spec.steps_for(total, batch_size, train=train, process_count=process_count)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def pad_values() -> dict:
    """Fill value of each batch key for padding examples (weight 0)."""
    return {"seg": data_spec.IGNORE_LABEL, "id": b""}


def _numpy_percentile_linear(sorted_values, q: float):
    """np.percentile(..., method='linear') of an ascending float64 vector, with numpy's exact arithmetic."""
    tf = tf_module()
    n = tf.cast(tf.size(sorted_values), tf.float64)
    quantile = tf.constant(q / 100.0, tf.float64)
    virtual = n * quantile + (1.0 + quantile * (1.0 - 1.0 - 1.0)) - 1.0
    previous = tf.floor(virtual)
    gamma = virtual - previous
    last = tf.size(sorted_values) - 1
    lo = tf.clip_by_value(tf.cast(previous, tf.int32), 0, last)
    hi = tf.clip_by_value(tf.cast(previous, tf.int32) + 1, 0, last)
    a, b = sorted_values[lo], sorted_values[hi]
    diff = b - a
    return tf.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)


def normalise_depth(depth, depth_norm: str, depth_max_m: float):
    """depth float32 [H,W] in metres -> (normalised float32 [H,W,1], valid uint8 [H,W,1], scale float32 [])."""
    tf = tf_module()
    valid = tf.logical_and(depth > 0, tf.math.is_finite(depth))
    if depth_norm == "reference":
        # The reference loader: divide by the image's maximum, then clip to [0.1, p99] of the divided map,
        # in float64 as numpy does. Invalid zeros become 0.1; depth_valid keeps them identifiable.
        d = tf.cast(depth, tf.float64)
        maximum = tf.reduce_max(d)
        scale = tf.where(maximum > 0, maximum, tf.ones_like(maximum))
        divided = d / scale
        p99 = _numpy_percentile_linear(tf.sort(tf.reshape(divided, [-1])), 99.0)
        normalised = tf.minimum(tf.maximum(divided, tf.constant(0.1, tf.float64)), p99)
    elif depth_norm == "fixed":
        scale = tf.constant(depth_max_m, tf.float64)
        normalised = tf.clip_by_value(tf.cast(depth, tf.float64) / scale, 0.0, 1.0)
    else:
        scale = tf.constant(1.0, tf.float64)
        normalised = tf.cast(depth, tf.float64)
    return (tf.cast(normalised, tf.float32)[..., None], tf.cast(valid, tf.uint8)[..., None], tf.cast(scale, tf.float32))


def make_decoder(features, image_size, depth_norm: str, depth_max_m: float, with_ids: bool):
    """serialized tf.train.Example -> dict of compact tensors (uint8 image/seg/valid, float32 maps)."""
    tf = tf_module()
    height, width = image_size
    description = {"id": tf.io.FixedLenFeature([], tf.string)}
    for name in features:
        kind = data_spec.FEATURE_SPECS[name]["encoding"]
        description[name] = tf.io.FixedLenFeature([], tf.int64 if kind == "int64" else tf.string)

    def raw_f32(value, shape):
        return tf.reshape(tf.io.decode_raw(value, tf.float32, little_endian=True), shape)

    def decode(serialized):
        parsed = tf.io.parse_single_example(serialized, description)
        out = {}
        for name in features:
            value = parsed[name]
            if name == "image":
                image = tf.io.decode_png(value, channels=3)
                out["image"] = tf.ensure_shape(image, [height, width, 3])
            elif name == "seg":
                out["seg"] = tf.ensure_shape(tf.io.decode_png(value, channels=1)[..., 0], [height, width])
            elif name == "depth":
                out["depth"], out["depth_valid"], out["depth_scale"] = normalise_depth(
                    raw_f32(value, [height, width]), depth_norm, depth_max_m
                )
            elif name == "normals":
                out["normals"] = raw_f32(value, [height, width, 3])
            elif name == "edge":
                out["edge"] = raw_f32(value, [height, width, 1])
            else:
                out[name] = value
        out["weight"] = tf.constant(1.0, tf.float32)
        if with_ids:
            out["id"] = parsed["id"]
        return out

    return decode


def finalize_batch(batch):
    """Compact batched tensors -> the batch contract's dtypes."""
    tf = tf_module()
    out = {}
    for key, value in batch.items():
        if key == "image":
            out[key] = tf.cast(value, tf.float32) / 255.0
        elif key == "seg":
            out[key] = tf.cast(value, tf.int32)
        elif key == "depth_valid" or key in data_spec.ATTRIBUTE_FEATURES:
            out[key] = tf.cast(value, tf.float32)
        else:
            out[key] = value
    return out


def pad_batch_to(batch, batch_size: int):
    """Pads a (possibly short) batch along axis 0 to batch_size with weight-0 examples."""
    tf = tf_module()
    fills = pad_values()
    missing = batch_size - tf.shape(batch["weight"])[0]
    out = {}
    for key, value in batch.items():
        fill_shape = tf.concat([[missing], tf.shape(value)[1:]], axis=0)
        fill = tf.fill(fill_shape, tf.constant(fills.get(key, 0), dtype=value.dtype))
        out[key] = tf.concat([value, fill], axis=0)
    return out


def zero_batch(element_spec, batch_size: int):
    tf = tf_module()
    fills = pad_values()
    return {
        key: tf.fill([batch_size] + spec.shape[1:].as_list(), tf.constant(fills.get(key, 0), spec.dtype))
        for key, spec in element_spec.items()
    }


def epoch_seeds(seed: int, epoch: int) -> tuple[np.random.Generator, int, int]:
    """Everything random about an epoch's order derives from (seed, epoch) and nothing else."""
    sequence = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
    file_seed, buffer_seed, permutation_seed = (int(s) & 0x7FFFFFFF for s in sequence.generate_state(3))
    return np.random.default_rng(permutation_seed), file_seed, buffer_seed


# --------------------------------------------------------------------------------------------------
# Streaming (large splits) and cached (small splits) datasets
# --------------------------------------------------------------------------------------------------


def record_dataset(files, *, shuffle_seed: int | None, interleave: bool):
    tf = tf_module()
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_seed is not None:
        files_ds = files_ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=False)
    return files_ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(4, len(files)) if interleave else 1,
        block_length=1,
        **({"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True} if interleave else {}),
    )


def streaming_dataset(files, decode, *, batch_size, train, seed, epoch, process_index, process_count, steps, num_total):
    tf = tf_module()
    _, file_seed, buffer_seed = epoch_seeds(seed, epoch)
    ds = record_dataset(files, shuffle_seed=file_seed if train else None, interleave=train)
    ds = ds.shard(process_count, process_index)
    if train:
        buffer = min(STREAM_SHUFFLE_BUFFER, max(1, num_total // process_count))
        ds = ds.shuffle(buffer, seed=buffer_seed, reshuffle_each_iteration=False).take(steps * batch_size)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if train:
        return ds.batch(batch_size, drop_remainder=True)
    ds = ds.batch(batch_size).map(lambda b: pad_batch_to(b, batch_size))
    # Every process yields `steps` batches, so a process with one example fewer adds a padding batch.
    padding = tf.data.Dataset.from_tensors(zero_batch(ds.element_spec, batch_size)).repeat()
    return ds.concatenate(padding).take(steps)


def decoded_split(files, decode, cache_key) -> dict:
    """All examples of a split, decoded (compact dtypes), in manifest order, as TF tensors in host memory."""
    if cache_key in DECODED_CACHE:
        DECODED_CACHE.move_to_end(cache_key)
        return DECODED_CACHE[cache_key]
    tf = tf_module()
    ds = record_dataset(files, shuffle_seed=None, interleave=False)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    parts = collections.defaultdict(list)
    for batch in ds.as_numpy_iterator():
        for key, value in batch.items():
            parts[key].append(value)
    with tf.device("/CPU:0"):
        arrays = {key: tf.constant(np.concatenate(values, axis=0)) for key, values in parts.items()}
    DECODED_CACHE[cache_key] = arrays
    while len(DECODED_CACHE) > DECODED_CACHE_ENTRIES:
        DECODED_CACHE.popitem(last=False)
    return arrays


def example_order(
    num_total: int,
    *,
    train: bool,
    seed: int,
    epoch: int,
    steps: int,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> np.ndarray:
    """[steps, batch_size] example indices of this process, -1 for padding: the order contract of every loader.

    Training: one permutation drawn from (seed, epoch) alone; step s's global batch is
    permutation[s·P·B : (s+1)·P·B], process p taking the p-th block of B, so the global batch (rows in process
    order on the mesh) is the same for any number of processes. Evaluation: example i to process i mod P, the
    last batch padded with -1.
    """
    if train:
        rng, _, _ = epoch_seeds(seed, epoch)
        order = rng.permutation(num_total)[: steps * process_count * batch_size]
        mine = order.reshape(steps, process_count, batch_size)[:, process_index].reshape(-1)
    else:
        mine = np.arange(num_total)[process_index::process_count]
        mine = np.concatenate([mine, np.full(steps * batch_size - len(mine), -1)])
    return mine.astype(np.int64).reshape(steps, batch_size)


def cached_dataset(arrays, *, batch_size, train, seed, epoch, process_index, process_count, steps, num_total):
    tf = tf_module()
    index_batches = example_order(
        num_total,
        train=train,
        seed=seed,
        epoch=epoch,
        steps=steps,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    fills = pad_values()

    def gather(indices):
        present = indices >= 0
        safe = tf.maximum(indices, 0)
        out = {}
        for key, table in arrays.items():
            values = tf.gather(table, safe)
            mask = tf.reshape(present, [-1] + [1] * (len(table.shape) - 1))
            out[key] = tf.where(mask, values, tf.constant(fills.get(key, 0), table.dtype))
        return out

    return tf.data.Dataset.from_tensor_slices(index_batches).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def make_dataset(
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
    data_format: str = "shards",
    features=None,
):
    """One epoch of `split` for this process, as a tf.data.Dataset of batch dicts (see the module docstring).

    batch_size: the per-process batch. train=True: order from (seed, epoch), drop_remainder, weight 1.
    train=False: manifest order, every example of this process once, last batch padded with weight-0
    examples. Every process yields the same number of batches, `steps_per_epoch(...)`.
    cache: keep the decoded split in memory (None: when its shards total < 1 GiB).
    with_ids: also yield 'id' (bytes [B], b'' for padding). verify: see data_spec.load_manifest.
    data_format: 'shards' (manifest.json + our TFRecord shards) or 'tfds' (a tfds dataset directory, read by
    tfds_source, whose `features` maps our feature names to the dataset's; see data.features in the config).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    if depth_norm not in DEPTH_NORMS:
        raise ValueError(f"depth_norm must be one of {DEPTH_NORMS}, got {depth_norm!r}")
    if not depth_max_m > 0:
        raise ValueError(f"depth_max_m must be positive, got {depth_max_m}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415  (only when the caller leaves the process layout to JAX)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if data_format == "tfds":  # same batches, order and padding, from tfds's reader
        from mtl_sparse_jax.data import tfds_source  # noqa: PLC0415

        return tfds_source.make_dataset(
            data_dir,
            split,
            tasks=tasks,
            features=features,
            batch_size=batch_size,
            train=train,
            seed=seed,
            epoch=epoch,
            depth_norm=depth_norm,
            depth_max_m=depth_max_m,
            process_index=process_index,
            process_count=process_count,
            cache=cache,
            prefetch=prefetch,
            with_ids=with_ids,
            verify=verify,
        )

    data_dir = os.fspath(data_dir)
    manifest = data_spec.load_manifest(data_dir, verify="none")
    entry = data_spec.split_entry(manifest, split, data_dir)
    features = data_spec.features_for_tasks(manifest, list(tasks), data_dir)
    if verify != "none":
        data_spec.verify_split_shards(data_dir, manifest, split, verify=verify)
    num_total = entry["num_examples"]
    steps = data_spec.steps_for(num_total, batch_size, train=train, process_count=process_count)
    if steps == 0:
        raise DataError(
            f"split '{split}' of {data_dir} has {num_total} examples, fewer than one batch of "
            f"{batch_size} per process for {process_count} process(es); lower the batch size"
        )
    files = [os.path.join(data_dir, shard["file"]) for shard in entry["shards"]]
    image_size = tuple(manifest["image_size"])
    tf = tf_module()
    decode = make_decoder(features, image_size, depth_norm, float(depth_max_m), with_ids)
    split_bytes = sum(shard["bytes"] for shard in entry["shards"])
    if cache is None:
        cache = split_bytes < AUTO_CACHE_MAX_BYTES
    layout = dict(
        batch_size=batch_size,
        train=train,
        seed=seed,
        epoch=epoch,
        process_index=process_index,
        process_count=process_count,
        steps=steps,
        num_total=num_total,
    )
    if cache:
        cache_key = (
            os.path.abspath(data_dir),
            split,
            tuple(features),
            depth_norm,
            float(depth_max_m),
            with_ids,
            tuple((s["file"], s["sha256"], s["bytes"]) for s in entry["shards"]),
        )
        try:
            arrays = decoded_split(files, decode, cache_key)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise corruption_error(data_dir, manifest, split, e) from None
        ds = cached_dataset(arrays, **layout)
    else:
        ds = streaming_dataset(files, decode, **layout)
    ds = ds.map(finalize_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(prefetch) if prefetch else ds


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
    data_format: str = "shards",
    features=None,
) -> Iterator[dict]:
    """make_dataset(...) as dicts of numpy arrays; a corrupted shard raises DataError naming it.

    Argument errors (a missing task, directory or manifest) are raised here, not at the first batch.
    """
    ds = make_dataset(
        data_dir,
        split,
        tasks=tasks,
        batch_size=batch_size,
        train=train,
        seed=seed,
        epoch=epoch,
        depth_norm=depth_norm,
        depth_max_m=depth_max_m,
        process_index=process_index,
        process_count=process_count,
        cache=cache,
        prefetch=prefetch,
        with_ids=with_ids,
        verify=verify,
        data_format=data_format,
        features=features,
    )
    if data_format == "tfds":
        from mtl_sparse_jax.data import tfds_source  # noqa: PLC0415

        return tfds_source.numpy_batches(ds, data_dir, split)
    return numpy_batches(ds, data_dir, split)


def numpy_batches(ds, data_dir: str, split: str) -> Iterator[dict]:
    tf = tf_module()
    try:
        yield from ds.as_numpy_iterator()
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        manifest = data_spec.load_manifest(data_dir, verify="none")
        raise corruption_error(data_dir, manifest, split, e) from None


def corruption_error(data_dir, manifest, split, error) -> DataError:
    """Finds the shard that fails its checksum, to name it; falls back to the split."""
    try:
        data_spec.verify_split_shards(data_dir, manifest, split, verify="sha256")
    except DataError as named:
        return named
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(
        f"split '{split}' of {data_dir} cannot be decoded ({first_line}); its shards match their "
        f"checksums, so the converter wrote bad data: rerun it into an empty directory"
    )
