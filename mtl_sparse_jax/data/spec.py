"""Feature specs, example validation and the shard manifest: the data contract between writer and reader.

`data_prep/shards.py` writes TFRecord shards plus `manifest.json`; `mtl_sparse_jax/data/pipeline.py` reads
them. Both take every fact about the on-disk format from this module, which needs only numpy (no TensorFlow),
so that the manifest can be checked on a machine that has JAX and nothing else.

On-disk layout (see docs/architecture.md)::

    DATA_DIR/manifest.json
    DATA_DIR/<split>-<k:05d>-of-<n:05d>.tfrecord     one tf.train.Example per image
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "mtl-sparse-jax-shards"
FORMAT_VERSION = 1

# How each feature is stored in a tf.train.Example. 'shape' is relative to the image size (H, W).
#   png      : PNG bytes (uint8); 3 channels for the image, 1 channel for labels
#   raw_f32  : little-endian float32 bytes of the array, row-major
#   int64    : a single int64 value
FEATURE_SPECS: dict[str, dict[str, Any]] = {
    "image": {"encoding": "png", "dtype": "uint8", "channels": 3},
    "seg": {"encoding": "png", "dtype": "uint8", "channels": 0, "ignore_label": 255},
    "depth": {"encoding": "raw_f32", "dtype": "float32", "channels": 0, "unit": "metres, 0 = invalid"},
    "normals": {"encoding": "raw_f32", "dtype": "float32", "channels": 3, "unit": "(0,0,0) = invalid"},
    "edge": {"encoding": "raw_f32", "dtype": "float32", "channels": 0},
    "male": {"encoding": "int64", "dtype": "int64", "values": [0, 1]},
    "smile": {"encoding": "int64", "dtype": "int64", "values": [0, 1]},
    "eyebrows": {"encoding": "int64", "dtype": "int64", "values": [0, 1]},
    "glasses": {"encoding": "int64", "dtype": "int64", "values": [0, 1]},
}
ATTRIBUTE_FEATURES = ("male", "smile", "eyebrows", "glasses")
DENSE_FEATURES = ("seg", "depth", "normals", "edge")
ID_FEATURE = "id"
IGNORE_LABEL = 255

# Task name -> stored feature it is trained on. Feature names are the task target names.
TASK_FEATURES: dict[str, str] = {name: name for name in DENSE_FEATURES + ATTRIBUTE_FEATURES}

SHARD_NAME_RE = re.compile(r"^(?P<split>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.tfrecord$")
VERIFY_MODES = ("none", "size", "sha256")

CONVERT_HINT = (
    "run: python -m data_prep.synthetic --out DIR for the demo data, or convert a dataset with "
    "python -m data_prep.nyu / data_prep.celeba (README, section 'Data')"
)


class DataError(ValueError):
    """A data directory, manifest or shard is missing or inconsistent. The message names the file and the fix."""


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def feature_shape(name: str, image_size: tuple[int, int]) -> tuple[int, ...]:
    """Shape of one stored example's feature (attributes are scalars)."""
    spec = FEATURE_SPECS[name]
    if spec["encoding"] == "int64":
        return ()
    height, width = image_size
    return (height, width, spec["channels"]) if spec["channels"] else (height, width)


def available_tasks(features) -> list[str]:
    return [task for task, feature in TASK_FEATURES.items() if feature in set(features)]


def sha256_of_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


# --------------------------------------------------------------------------------------------------
# Example validation (used by the writer on every example before it is serialised)
# --------------------------------------------------------------------------------------------------


def validate_example(
    example: Mapping[str, Any],
    *,
    image_size: tuple[int, int] | None = None,
    num_classes: Mapping[str, int] | None = None,
) -> None:
    """Raises ValueError with a one-line reason when `example` breaks the feature spec.

    `image_size` (H, W) fixes the spatial shape of every dense feature; when None, the image's own size is
    used, so that all features must still agree with each other. `num_classes['seg']` bounds the labels
    (255 = ignore is always allowed).
    """
    if ID_FEATURE not in example or not isinstance(example[ID_FEATURE], str) or not example[ID_FEATURE]:
        raise ValueError("missing or empty 'id' (a non-empty str that identifies the example)")
    unknown = sorted(set(example) - set(FEATURE_SPECS) - {ID_FEATURE})
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known features are {sorted(FEATURE_SPECS)}")
    if "image" not in example:
        raise ValueError("missing 'image' (uint8 [H,W,3])")
    image = example["image"]
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"'image' must be a numpy array [H,W,3], got {_describe(image)}; convert grayscale or "
            f"RGBA images to RGB first"
        )
    if image_size is None:
        image_size = image.shape[:2]
    image_size = tuple(int(s) for s in image_size)
    for name, value in example.items():
        if name == ID_FEATURE:
            continue
        spec = FEATURE_SPECS[name]
        if spec["encoding"] == "int64":
            _validate_attribute(name, value)
            continue
        expected_shape = feature_shape(name, image_size)
        if not isinstance(value, np.ndarray):
            raise ValueError(
                f"'{name}' must be a numpy array {list(expected_shape)} {spec['dtype']}, got {_describe(value)}"
            )
        if value.dtype != np.dtype(spec["dtype"]):
            raise ValueError(
                f"'{name}' has dtype {value.dtype}, expected {spec['dtype']}; cast it with "
                f".astype(np.{spec['dtype']}) after checking its range"
            )
        if value.shape != expected_shape:
            raise ValueError(
                f"'{name}' has shape {list(value.shape)}, expected {list(expected_shape)}; resize it "
                f"to the dataset's image size {list(image_size)}"
            )
        if spec["encoding"] == "raw_f32" and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise ValueError(f"'{name}' has {bad} NaN/inf values; store invalid pixels as 0 instead")
        if name == "depth" and np.any(value < 0):
            raise ValueError(
                f"'depth' has negative values (min {float(value.min()):g}); depth is in metres with 0 = invalid"
            )
        if name == "normals" and np.any(np.abs(value) > 1.0 + 1e-3):
            raise ValueError(
                f"'normals' has components outside [-1, 1] (max |n_i| {float(np.abs(value).max()):g}); "
                f"store unit vectors in [-1, 1], not an image encoding such as 0..255"
            )
        if name == "seg":
            limit = None if not num_classes else num_classes.get("seg")
            if limit is not None:
                bad = (value >= limit) & (value != IGNORE_LABEL)
                if np.any(bad):
                    labels = sorted(int(v) for v in np.unique(value[bad]))
                    raise ValueError(
                        f"'seg' has label(s) {labels[:8]} outside 0..{limit - 1} (255 = ignore); "
                        f"check the label mapping or num_classes"
                    )


def _validate_attribute(name: str, value: Any) -> None:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if not isinstance(value, (int, np.integer)) or int(value) not in (0, 1):
        raise ValueError(f"attribute '{name}' must be an int in {{0, 1}}, got {value!r}; map -1/+1 annotations to 0/1")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {list(value.shape)} {value.dtype}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def feature_spec_for_manifest(features, image_size) -> dict[str, dict[str, Any]]:
    return {name: dict(FEATURE_SPECS[name], shape=list(feature_shape(name, image_size))) for name in features}


def validate_manifest(manifest: Any, path: str = MANIFEST_NAME) -> dict:
    """Checks the manifest's schema; raises DataError naming `path` on the first problem."""

    def fail(reason: str):
        raise DataError(
            f"{path}: {reason}; the conversion is incomplete or from another tool, rerun the "
            f"converter into an empty directory"
        )

    if not isinstance(manifest, dict):
        fail("not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        fail(f"'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        fail(f"format_version {manifest.get('format_version')!r} is not supported (this code reads {FORMAT_VERSION})")
    for key in ("dataset", "source_layout"):
        if not isinstance(manifest.get(key), str):
            fail(f"'{key}' must be a string")
    image_size = manifest.get("image_size")
    if (
        not isinstance(image_size, list)
        or len(image_size) != 2
        or not all(isinstance(s, int) and s > 0 for s in image_size)
    ):
        fail(f"'image_size' must be [H, W] with positive ints, got {image_size!r}")
    features = manifest.get("features")
    if not isinstance(features, list) or "image" not in features:
        fail("'features' must be a list that contains 'image'")
    unknown = sorted(set(features) - set(FEATURE_SPECS))
    if unknown:
        fail(f"unknown feature(s) {unknown}")
    num_classes = manifest.get("num_classes")
    if not isinstance(num_classes, dict):
        fail("'num_classes' must be an object, e.g. {\"seg\": 40}")
    if "seg" in features and not (isinstance(num_classes.get("seg"), int) and 0 < num_classes["seg"] <= 255):
        fail("'num_classes.seg' must be an int in 1..255 when 'seg' is a feature")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        fail("'splits' must be a non-empty object")
    for split, entry in splits.items():
        if not isinstance(entry, dict):
            fail(f"split '{split}' is not an object")
        shards = entry.get("shards")
        if not isinstance(shards, list) or not isinstance(entry.get("num_examples"), int):
            fail(f"split '{split}' needs 'num_examples' (int) and 'shards' (list)")
        total = 0
        for shard in shards:
            if not isinstance(shard, dict) or not all(k in shard for k in ("file", "num_examples", "sha256", "bytes")):
                fail(f"split '{split}': every shard needs file, num_examples, sha256, bytes")
            name = shard["file"]
            if not isinstance(name, str) or os.path.basename(name) != name or not SHARD_NAME_RE.match(name):
                fail(f"split '{split}': bad shard file name {name!r}")
            total += shard["num_examples"]
        if total != entry["num_examples"]:
            fail(f"split '{split}': shard counts add up to {total}, not num_examples {entry['num_examples']}")
    return manifest


def load_manifest(data_dir: str, *, verify: str = "size") -> dict:
    """Reads and checks DATA_DIR/manifest.json and its shards.

    verify: 'none' checks the schema only; 'size' also checks every shard exists with the recorded byte
    size (catches truncated or half-written shards, cheap); 'sha256' also checks every shard's checksum.
    Raises DataError (one line, naming the file and the fix) on any problem.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; {CONVERT_HINT.replace('DIR', data_dir)}")
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(
            f"{path} not found: {data_dir} holds no finished conversion (the manifest is written last); "
            f"rerun the converter, it resumes where it stopped; {CONVERT_HINT.replace('DIR', data_dir)}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); rerun the converter") from None
    validate_manifest(manifest, path)
    if verify != "none":
        for split in manifest["splits"]:
            verify_split_shards(data_dir, manifest, split, verify=verify)
    return manifest


def verify_split_shards(data_dir: str, manifest: dict, split: str, *, verify: str = "size") -> None:
    for shard in manifest["splits"][split]["shards"]:
        shard_path = os.path.join(data_dir, shard["file"])
        if not os.path.isfile(shard_path):
            raise DataError(
                f"shard {shard_path} listed in {MANIFEST_NAME} is missing; rerun the converter with the "
                f"same --out to rebuild it"
            )
        size = os.path.getsize(shard_path)
        if size != shard["bytes"]:
            raise DataError(
                f"shard {shard_path} is {size} bytes but {MANIFEST_NAME} says {shard['bytes']} "
                f"(truncated or overwritten); delete it and rerun the converter to rebuild it"
            )
        if verify == "sha256" and sha256_of_file(shard_path) != shard["sha256"]:
            raise DataError(
                f"shard {shard_path} fails its sha256 checksum (corrupted); delete it and rerun the "
                f"converter to rebuild it"
            )


def split_entry(manifest: dict, split: str, data_dir: str = "") -> dict:
    if split not in manifest["splits"]:
        raise DataError(
            f"split '{split}' is not in {os.path.join(data_dir, MANIFEST_NAME)}; it has {sorted(manifest['splits'])}"
        )
    return manifest["splits"][split]


def features_for_tasks(manifest: dict, tasks, data_dir: str = "") -> list[str]:
    """The stored features that `tasks` need, plus the image. Unknown or absent tasks raise DataError."""
    features = []
    for task in tasks:
        if task not in TASK_FEATURES:
            raise DataError(f"unknown task '{task}'; known tasks are {sorted(TASK_FEATURES)}")
        feature = TASK_FEATURES[task]
        if feature not in manifest["features"]:
            raise DataError(
                f"task '{task}' needs feature '{feature}', which {data_dir or 'the data directory'} "
                f"(dataset '{manifest['dataset']}') does not have; its tasks are "
                f"{available_tasks(manifest['features'])}; remove '{task}' from the config's tasks or "
                f"use a dataset that has it"
            )
        if feature not in features:
            features.append(feature)
    return ["image"] + features


def steps_for(num_examples_total: int, batch_size: int, *, train: bool, process_count: int = 1) -> int:
    """Batches per epoch per process. Examples are dealt round-robin to processes (example i to process
    i mod P), so every process holds at least floor(N/P) and at most ceil(N/P) examples. Training drops the
    remainder and every process runs floor(floor(N/P)/B) steps; evaluation pads to ceil(ceil(N/P)/B)."""
    if batch_size <= 0 or process_count <= 0:
        raise ValueError(f"batch_size and process_count must be positive, got {batch_size}, {process_count}")
    if train:
        return (num_examples_total // process_count) // batch_size
    return math.ceil(math.ceil(num_examples_total / process_count) / batch_size)
