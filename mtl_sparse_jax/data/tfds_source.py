"""A tfds dataset directory as a training source: `data.format='tfds'`, read with `tfds.builder_from_directory`.

`pipeline.make_dataset(..., data_format='tfds')` comes here. The batches follow the same contract as the
TFRecord path (see `pipeline`'s docstring): the same keys, dtypes, depth normalisation, order (evaluation: the
split's order, example i to process i mod P; training: one permutation drawn from (seed, epoch), cut into
global batches, see `pipeline.example_order`) and padding (weight-0 examples, `seg` 255). The helpers that define those contracts are the
pipeline's own, so the two paths cannot drift apart.

`features` maps our feature names (`image` and the task targets: `seg`, `depth`, `normals`, `edge`, `male`,
`smile`, `eyebrows`, `glasses`) to the feature names of the tfds dataset; a name it leaves out is looked up as
itself, which is how the directories our converters write are read. What each feature must be:

    image    uint8 [H,W,3] (tfds Image)          seg      integer [H,W] or [H,W,1], 255 = ignore
    depth    float [H,W] or [H,W,1], metres, 0 = invalid
    normals  float [H,W,3], (0,0,0) = invalid    edge     numeric [H,W] or [H,W,1]
    attributes: a scalar in {0, 1} (ClassLabel, int, bool or float)

H and W must be fixed in the dataset's features (batches are stacked); a feature the config's tasks do not
need is neither checked nor decoded. tensorflow_datasets is imported inside functions only.
"""

from __future__ import annotations

import collections
import logging
import os

import numpy as np

from mtl_sparse_jax.data import pipeline
from mtl_sparse_jax.data import spec as data_spec
from mtl_sparse_jax.data.spec import DataError

OUR_FEATURES = ("image",) + data_spec.DENSE_FEATURES + data_spec.ATTRIBUTE_FEATURES
INFO_FILE = "dataset_info.json"
TFDS_ID = "tfds_id"


def feature_names(features=None) -> dict[str, str]:
    """Our feature name -> the tfds feature name, for every one of OUR_FEATURES (absent keys map to themselves).

    `features`: None, a dict or a ConfigDict such as the config's `data.features`.
    """
    given = {} if features is None else dict(features.items())
    unknown = sorted(set(given) - set(OUR_FEATURES))
    if unknown:
        raise DataError(f"data.features has unknown key(s) {unknown}; the keys are {list(OUR_FEATURES)}")
    names = {}
    for ours in OUR_FEATURES:
        name = given.get(ours) or ours
        if not isinstance(name, str):
            raise DataError(f"data.features.{ours} must be a tfds feature name (str), got {name!r}")
        names[ours] = name
    return names


def _builder(data_dir: str):
    pipeline.tf_module()  # hides the GPUs from TensorFlow before tfds touches it
    import tensorflow_datasets as tfds  # noqa: PLC0415

    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; set data.dir to a tfds dataset directory")
    if not os.path.isfile(os.path.join(data_dir, INFO_FILE)):
        if os.path.isfile(os.path.join(data_dir, data_spec.MANIFEST_NAME)):
            raise DataError(
                f"{os.path.join(data_dir, INFO_FILE)} not found: {data_dir} holds our shards without tfds "
                f"metadata (converted by an older version); run python -m data_prep.tfds_meta --data "
                f"{data_dir}, or use data.format='shards'"
            )
        raise DataError(
            f"{os.path.join(data_dir, INFO_FILE)} not found: {data_dir} is not a tfds dataset directory (the "
            f"folder of one version, e.g. ~/tensorflow_datasets/NAME/1.0.0); point data.dir there, or use "
            f"data.format='shards' for a folder that holds only manifest.json"
        )
    try:
        return tfds.builder_from_directory(data_dir)
    except Exception as e:  # tfds raises many types for bad metadata; the message names the folder
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{data_dir}: tfds cannot read its metadata ({first_line}); rebuild the dataset") from None


def _connector(builder, ours: str, names: dict, data_dir: str):
    name = names[ours]
    top = builder.info.features
    if name not in top.keys():
        drop = "" if ours == "image" else f", or leave task '{ours}' out of the config's tasks"
        raise DataError(
            f"{data_dir} (tfds dataset '{builder.info.name}') has no feature '{name}' for data.features.{ours}; "
            f"its features are {sorted(top.keys())}: set data.features.{ours} to one of them{drop}"
        )
    return name, top[name]


def _tensor_spec(connector, name: str, ours: str, data_dir: str):
    shape, dtype = getattr(connector, "shape", None), getattr(connector, "np_dtype", None)
    if not isinstance(shape, tuple) or dtype is None:
        raise DataError(
            f"{data_dir}: feature '{name}' (data.features.{ours}) is a {type(connector).__name__}, not a "
            f"tensor; name a tensor or image feature"
        )
    return shape, np.dtype(dtype)


def _check(connector, name: str, ours: str, image_size, data_dir: str) -> None:
    """Raises DataError when the feature cannot stand for our feature `ours` (shape, dtype)."""
    shape, dtype = _tensor_spec(connector, name, ours, data_dir)
    height, width = image_size
    where = f"{data_dir}: feature '{name}' (data.features.{ours}) has shape {shape} {dtype}"
    if ours in data_spec.ATTRIBUTE_FEATURES:
        if shape != () or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise DataError(f"{where}; attribute '{ours}' needs a numeric scalar in {{0, 1}}")
        return
    channels = 3 if ours in ("image", "normals") else 1
    allowed = [(height, width, channels)] + ([(height, width)] if channels == 1 else [])
    if shape not in allowed:
        raise DataError(
            f"{where}, expected {' or '.join(str(s) for s in allowed)} (the image size comes from "
            f"data.features.image); resize the dataset to one fixed size"
        )
    if ours == "image" and dtype != np.uint8:
        raise DataError(f"{where}; the image must be uint8 0..255")
    if ours == "seg" and not np.issubdtype(dtype, np.integer):
        raise DataError(f"{where}; a label map must be integer class ids (255 = ignore)")
    if ours in ("depth", "normals") and not np.issubdtype(dtype, np.floating):
        raise DataError(f"{where}; '{ours}' must be floating point ({'metres' if ours == 'depth' else 'unit vectors'})")
    if ours == "edge" and not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise DataError(f"{where}; 'edge' must be numeric")


def _image_size(builder, names: dict, data_dir: str) -> tuple[int, int]:
    name, connector = _connector(builder, "image", names, data_dir)
    shape, _ = _tensor_spec(connector, name, "image", data_dir)
    if len(shape) != 3 or not all(isinstance(s, int) for s in shape[:2]):
        raise DataError(
            f"{data_dir}: feature '{name}' (data.features.image) has shape {shape}; training needs one fixed "
            f"image size, e.g. Image(shape=(256, 256, 3)): resize the images when preparing the dataset"
        )
    size = (int(shape[0]), int(shape[1]))
    _check(connector, name, "image", size, data_dir)
    return size


def describe(data_dir: str, features=None) -> dict:
    """What the trainer needs before it builds the model: {'dataset', 'image_size': [H, W], 'features': our
    names the directory has, 'splits': {split: num_examples}, 'feature_names': ours -> tfds name}."""
    builder = _builder(data_dir)
    names = feature_names(features)
    image_size = _image_size(builder, names, os.fspath(data_dir))
    present = [ours for ours in OUR_FEATURES if names[ours] in builder.info.features.keys()]
    return {
        "dataset": builder.info.name,
        "image_size": list(image_size),
        "features": present,
        "splits": {split: int(info.num_examples) for split, info in builder.info.splits.items()},
        "feature_names": {ours: names[ours] for ours in present},
    }


def _split_info(builder, split: str, data_dir: str):
    splits = builder.info.splits
    if split not in splits.keys():
        raise DataError(f"split '{split}' is not in the tfds dataset {data_dir}; it has {sorted(splits.keys())}")
    return splits[split]


def num_examples(data_dir: str, split: str) -> int:
    return int(_split_info(_builder(data_dir), split, os.fspath(data_dir)).num_examples)


def _verify_split(data_dir: str, split_info, split: str, verify: str) -> None:
    """'size' and 'sha256': every shard file of the split exists (tfds records no per-file size); 'sha256' also
    checks the shards' checksums where a manifest.json written by our converters lists them."""
    if verify == "none":
        return
    for path in split_info.filepaths:
        if not os.path.isfile(os.fspath(path)):
            raise DataError(
                f"shard {path} of split '{split}' listed in {os.path.join(data_dir, INFO_FILE)} is missing; "
                f"restore it or rebuild the dataset"
            )
    if verify == "sha256":
        if not os.path.isfile(os.path.join(data_dir, data_spec.MANIFEST_NAME)):
            raise DataError(
                f"data.verify='sha256' needs checksums, and {data_dir} (a tfds dataset without our "
                f"{data_spec.MANIFEST_NAME}) records none; use data.verify='size'"
            )
        manifest = data_spec.load_manifest(data_dir, verify="none")
        data_spec.verify_split_shards(data_dir, manifest, split, verify="sha256")


def _needed(builder, tasks, names: dict, image_size, data_dir: str) -> dict[str, tuple[str, object]]:
    """ours -> (tfds name, connector) for the image and every feature the tasks need, each checked."""
    wanted = ["image"]
    for task in tasks:
        if task not in data_spec.TASK_FEATURES:
            raise DataError(f"unknown task '{task}'; known tasks are {sorted(data_spec.TASK_FEATURES)}")
        if data_spec.TASK_FEATURES[task] not in wanted:
            wanted.append(data_spec.TASK_FEATURES[task])
    needed = {}
    for ours in wanted:
        name, connector = _connector(builder, ours, names, data_dir)
        _check(connector, name, ours, image_size, data_dir)
        needed[ours] = (name, connector)
    return needed


def _make_decoder(needed, image_size, depth_norm: str, depth_max_m: float, id_key: str | None):
    """Undecoded tfds example -> the same compact tensors as pipeline's decoder (uint8 image, float32 maps)."""
    tf = pipeline.tf_module()
    height, width = image_size

    def decode(example):
        out = {}
        for ours, (name, connector) in needed.items():
            value = connector.decode_example(example[name])
            if ours == "image":
                out["image"] = tf.ensure_shape(value, [height, width, 3])
            elif ours == "seg":
                value = tf.reshape(value, [height, width])
                out["seg"] = value if value.dtype == tf.uint8 else tf.cast(value, tf.int32)
            elif ours == "depth":
                depth = tf.reshape(tf.cast(value, tf.float32), [height, width])
                out["depth"], out["depth_valid"], out["depth_scale"] = pipeline.normalise_depth(
                    depth, depth_norm, depth_max_m
                )
            elif ours == "normals":
                out["normals"] = tf.ensure_shape(tf.cast(value, tf.float32), [height, width, 3])
            elif ours == "edge":
                out["edge"] = tf.reshape(tf.cast(value, tf.float32), [height, width, 1])
            else:
                out[ours] = tf.cast(value, tf.float32)
        out["weight"] = tf.constant(1.0, tf.float32)
        if id_key is not None:
            out["id"] = example[id_key]
        return out

    return decode


class _ShuffledOrderedDatasetFilter(logging.Filter):
    """Drops tfds's warning that an ordered dataset is read shuffled: training does that on purpose, every epoch."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an ordered dataset" not in record.getMessage()


_LOG_FILTER = _ShuffledOrderedDatasetFilter()


def _read(builder, split: str, needed, id_key, *, shuffle_seed: int | None, cycle_length: int):
    """The split's examples, undecoded (tfds's SkipDecoding), in the split's order unless shuffle_seed is set."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    if _LOG_FILTER not in logging.getLogger("absl").filters:
        logging.getLogger("absl").addFilter(_LOG_FILTER)

    keys = [name for name, _ in needed.values()] + ([id_key] if id_key not in (None, TFDS_ID) else [])
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed,
        shuffle_reshuffle_each_iteration=False,
        interleave_cycle_length=cycle_length,
        interleave_block_length=1,
        add_tfds_id=id_key == TFDS_ID,
        try_autocache=False,  # small splits are cached below, decoded
        enable_ordering_guard=False,  # datasets written in order may still be read shuffled for training
        skip_prefetch=True,
    )
    decoders = tfds.decode.PartialDecoding(
        {k: True for k in keys}, decoders={name: tfds.decode.SkipDecoding() for name, _ in needed.values()}
    )
    return builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, decoders=decoders, read_config=read_config
    )


def _decoded_split(builder, split, needed, id_key, decode, cache_key) -> dict:
    """All examples of a split, decoded (compact dtypes), in the split's order, as TF tensors in host memory."""
    cache = pipeline.DECODED_CACHE
    if cache_key in cache:
        cache.move_to_end(cache_key)
        return cache[cache_key]
    tf = pipeline.tf_module()
    ds = _read(builder, split, needed, id_key, shuffle_seed=None, cycle_length=1)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    parts = collections.defaultdict(list)
    for batch in ds.as_numpy_iterator():
        for key, value in batch.items():
            parts[key].append(value)
    with tf.device("/CPU:0"):
        arrays = {key: tf.constant(np.concatenate(values, axis=0)) for key, values in parts.items()}
    cache[cache_key] = arrays
    while len(cache) > pipeline.DECODED_CACHE_ENTRIES:
        cache.popitem(last=False)
    return arrays


def _streaming_dataset(
    builder,
    split,
    needed,
    id_key,
    decode,
    num_shards,
    *,
    batch_size,
    train,
    seed,
    epoch,
    process_index,
    process_count,
    steps,
    num_total,
):
    """pipeline.streaming_dataset over tfds's reader: seeded file shuffle and buffer, round-robin, padding."""
    tf = pipeline.tf_module()
    _, file_seed, buffer_seed = pipeline.epoch_seeds(seed, epoch)
    cycle = min(4, num_shards) if train else 1
    ds = _read(builder, split, needed, id_key, shuffle_seed=file_seed if train else None, cycle_length=cycle)
    ds = ds.shard(process_count, process_index)
    if train:
        buffer = min(pipeline.STREAM_SHUFFLE_BUFFER, max(1, num_total // process_count))
        ds = ds.shuffle(buffer, seed=buffer_seed, reshuffle_each_iteration=False).take(steps * batch_size)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if train:
        return ds.batch(batch_size, drop_remainder=True)
    ds = ds.batch(batch_size).map(lambda b: pipeline.pad_batch_to(b, batch_size))
    padding = tf.data.Dataset.from_tensors(pipeline.zero_batch(ds.element_spec, batch_size)).repeat()
    return ds.concatenate(padding).take(steps)


def make_dataset(
    data_dir: str,
    split: str,
    *,
    tasks,
    features=None,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    depth_norm: str = "reference",
    depth_max_m: float = 10.0,
    process_index: int,
    process_count: int,
    cache: bool | None = None,
    prefetch: int = 2,
    with_ids: bool = False,
    verify: str = "size",
):
    """pipeline.make_dataset for a tfds dataset directory (its arguments are checked there).

    with_ids: 'id' is the dataset's 'id' feature when it has a string one, else tfds's own example id.
    """
    data_dir = os.fspath(data_dir)
    builder = _builder(data_dir)
    names = feature_names(features)
    image_size = _image_size(builder, names, data_dir)
    split_info = _split_info(builder, split, data_dir)
    needed = _needed(builder, list(tasks), names, image_size, data_dir)
    _verify_split(data_dir, split_info, split, verify)
    id_key = None
    if with_ids:
        top = builder.info.features
        has_id = "id" in top.keys() and getattr(top["id"], "shape", None) == () and top["id"].np_dtype == np.object_
        id_key = "id" if has_id else TFDS_ID
    num_total = int(split_info.num_examples)
    steps = data_spec.steps_for(num_total, batch_size, train=train, process_count=process_count)
    if steps == 0:
        raise DataError(
            f"split '{split}' of {data_dir} has {num_total} examples, fewer than one batch of "
            f"{batch_size} per process for {process_count} process(es); lower the batch size"
        )
    tf = pipeline.tf_module()
    decode = _make_decoder(needed, image_size, depth_norm, float(depth_max_m), id_key)
    if cache is None:
        cache = int(split_info.num_bytes) < pipeline.AUTO_CACHE_MAX_BYTES
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
        info_path = os.path.join(data_dir, INFO_FILE)
        cache_key = (
            "tfds",
            os.path.abspath(data_dir),
            split,
            tuple((ours, name) for ours, (name, _) in needed.items()),
            depth_norm,
            float(depth_max_m),
            id_key,
            tuple(split_info.shard_lengths),
            os.stat(info_path).st_mtime_ns,
        )
        try:
            arrays = _decoded_split(builder, split, needed, id_key, decode, cache_key)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise _decode_error(data_dir, split, e) from None
        ds = pipeline.cached_dataset(arrays, **layout)
    else:
        ds = _streaming_dataset(builder, split, needed, id_key, decode, int(split_info.num_shards), **layout)
    ds = ds.map(pipeline.finalize_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(prefetch) if prefetch else ds


def numpy_batches(ds, data_dir: str, split: str):
    """Iterates `ds` as dicts of numpy arrays; a shard that cannot be decoded raises DataError naming the split."""
    tf = pipeline.tf_module()
    try:
        yield from ds.as_numpy_iterator()
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise _decode_error(data_dir, split, e) from None


def _decode_error(data_dir: str, split: str, error) -> DataError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(
        f"split '{split}' of the tfds dataset {data_dir} cannot be decoded ({first_line}); a shard is "
        f"corrupted or does not match features.json: rebuild the dataset"
    )
