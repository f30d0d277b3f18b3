"""TFDS metadata for converted shards, so that `tfds.builder_from_directory(DIR)` reads them as they are.

    python -m data_prep.tfds_meta --data DIR      (for a folder converted before the converters wrote it)

Every converter calls `write_tfds_metadata(DIR)` after `manifest.json`; it adds `dataset_info.json` and
`features.json` (written by `tfds.folder_dataset.write_metadata`) next to the shards. The shards are not
rewritten: each stored feature has a tfds feature connector that decodes our encoding exactly
(`mtl_sparse_jax.data.spec.FEATURE_SPECS`):

    image                     PNG, uint8 [H,W,3]         -> tfds.features.Image(shape=(H,W,3), 'png')
    seg                       PNG, uint8 [H,W]           -> tfds.features.Image(shape=(H,W,1), 'png'); 255 = ignore
    depth, edge               raw little-endian float32  -> tfds.features.Tensor(shape=(H,W), float32, 'bytes')
    normals                   raw little-endian float32  -> tfds.features.Tensor(shape=(H,W,3), float32, 'bytes')
    male, smile, eyebrows,
    glasses                   int64 in {0, 1}            -> tfds.features.ClassLabel(num_classes=2)
    id                        UTF-8 bytes                -> tfds.features.Text()

`Tensor(encoding='bytes')` stores `array.tobytes()` in a bytes feature and reads it with
`tf.io.decode_raw(..., little_endian=True)` and a reshape, which is our raw float32 layout; `Image` decodes a
single-channel PNG with `channels=1` into [H,W,1]. A label map is an `Image`, not a `LabeledImage`, because
its ignore value 255 lies outside the class range a `LabeledImage` declares. The metadata also sets
`disable_shuffling=True`: the shards hold each split in the source's order, and tfds then reads them in that
order (one file after the other), so example i of `as_dataset(split=...)` is example i of the manifest.

The tfds files are written into a temporary folder and renamed into place, `dataset_info.json` last, so that a
crash never leaves a readable but half-written description.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from mtl_sparse_jax.data import spec as data_spec

# Our shard names, `<split>-<k:05d>-of-<n:05d>.tfrecord`, in tfds's filename-template language.
FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
TFDS_FILES = ("dataset_info.json", "features.json")

_DOCS = {
    "image": "RGB image, uint8",
    "seg": "semantic label map, uint8 [H,W,1]: class index 0..C-1, 255 = ignore (unlabelled)",
    "depth": "depth in metres, float32; 0 = invalid (no measurement)",
    "normals": "unit surface normals, float32 [H,W,3]; (0,0,0) = invalid",
    "edge": "edge map, float32 in {0, 1}",
    "male": "attribute 'Male' (1 = yes, 0 = no)",
    "smile": "attribute 'Smiling' (1 = yes, 0 = no)",
    "eyebrows": "attribute 'Bushy_Eyebrows' (1 = yes, 0 = no)",
    "glasses": "attribute 'Eyeglasses' (1 = yes, 0 = no)",
    "id": "example id in the source dataset",
}


def tfds_features(features, image_size, num_classes=None):
    """The tfds FeaturesDict that decodes our stored `features` (manifest names) at `image_size` exactly."""
    import numpy as np  # noqa: PLC0415
    import tensorflow_datasets as tfds  # noqa: PLC0415  (data_prep may import tfds; the model code may not)

    height, width = (int(s) for s in image_size)
    connectors = {data_spec.ID_FEATURE: tfds.features.Text(doc=_DOCS["id"])}
    for name in features:
        spec = data_spec.FEATURE_SPECS[name]
        shape = data_spec.feature_shape(name, (height, width))
        doc = _DOCS.get(name, name)
        if spec["encoding"] == "png":
            channels = spec["channels"] or 1  # a label map is a single-channel PNG
            if name == "seg" and num_classes and "seg" in num_classes:
                doc = doc.replace("0..C-1", f"0..{int(num_classes['seg']) - 1}")
            connectors[name] = tfds.features.Image(
                shape=(height, width, channels), dtype=np.uint8, encoding_format="png", doc=doc
            )
        elif spec["encoding"] == "raw_f32":
            connectors[name] = tfds.features.Tensor(shape=shape, dtype=np.float32, encoding="bytes", doc=doc)
        elif spec["encoding"] == "int64":
            connectors[name] = tfds.features.ClassLabel(num_classes=len(spec["values"]), doc=doc)
        else:  # a new encoding in FEATURE_SPECS needs a connector here
            raise ValueError(f"feature '{name}' has encoding {spec['encoding']!r}, which has no tfds connector")
    return tfds.features.FeaturesDict(connectors)


def _version_for(out_dir: str) -> str:
    """tfds's own rule: a folder named like a version ('1.0.0') gives it; anything else is 1.0.0."""
    from tensorflow_datasets.core import utils as tfds_utils  # noqa: PLC0415

    name = os.path.basename(os.path.normpath(out_dir))
    return name if tfds_utils.Version.is_valid(name) else "1.0.0"


def _description(manifest: dict) -> str:
    lines = [
        f"{manifest['dataset']} converted by mtl-sparse-jax's data_prep (source layout "
        f"{manifest['source_layout']}), {manifest['image_size'][0]}x{manifest['image_size'][1]}.",
        "manifest.json in this folder lists every shard with its sha256 and the conversion's parameters.",
    ]
    if manifest.get("num_classes"):
        lines.append(f"num_classes: {manifest['num_classes']}")
    return "\n".join(lines)


def write_tfds_metadata(out_dir: str, *, check: bool = True) -> list[str]:
    """Writes dataset_info.json and features.json for the finished conversion in `out_dir`; returns their paths.

    Reads `out_dir/manifest.json` (and checks the shards' sizes against it), so it describes exactly what
    the manifest lists. check=True then reads the first example of every split back through
    `tfds.builder_from_directory`, as `write_metadata(check_data=True)` would.
    """
    from absl import logging as absl_logging  # noqa: PLC0415

    # tfds warns about its own deprecated FeatureConnector.dtype while describing features: noise for our users.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return _write_tfds_metadata(out_dir, check=check)
    finally:
        absl_logging.set_verbosity(verbosity)


def _write_tfds_metadata(out_dir: str, *, check: bool) -> list[str]:
    import tensorflow_datasets as tfds  # noqa: PLC0415
    from tensorflow_datasets.core import naming  # noqa: PLC0415

    out_dir = os.path.abspath(os.fspath(out_dir))
    manifest = data_spec.load_manifest(out_dir, verify="size")
    features = tfds_features(list(manifest["features"]), tuple(manifest["image_size"]), manifest.get("num_classes"))
    for name in TFDS_FILES:  # a stale description must not outlive a failure below
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    staging = tempfile.mkdtemp(prefix=".tfds_meta.", dir=out_dir)
    try:
        # write_metadata finds the splits by listing data files that match the template in its data_dir. The
        # staging folder gets empty stand-ins with the shards' names: with split_infos given and
        # check_data=False, tfds reads nothing from them, and the real shards stay untouched.
        template = naming.ShardedFileTemplate(
            data_dir=staging,
            template=FILENAME_TEMPLATE,
            dataset_name=manifest["dataset"],
            filetype_suffix="tfrecord",
        )
        split_infos = []
        for split, entry in manifest["splits"].items():
            for shard in entry["shards"]:
                open(os.path.join(staging, shard["file"]), "wb").close()
            split_infos.append(
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[int(s["num_examples"]) for s in entry["shards"]],
                    num_bytes=sum(int(s["bytes"]) for s in entry["shards"]),
                    filename_template=template,
                )
            )
        tfds.folder_dataset.write_metadata(
            data_dir=staging,
            features=features,
            split_infos=split_infos,
            version=_version_for(out_dir),
            filename_template=template,
            check_data=False,
            description=_description(manifest),
            disable_shuffling=True,
        )
        stand_ins = {s["file"] for entry in manifest["splits"].values() for s in entry["shards"]}
        written = sorted(set(os.listdir(staging)) - stand_ins, key=lambda n: n == "dataset_info.json")
        if "dataset_info.json" not in written:
            raise RuntimeError(f"tfds wrote no dataset_info.json into {staging}")
        paths = []
        for name in written:  # dataset_info.json last: tfds reads nothing without it
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            paths.append(os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if check:
        builder = tfds.builder_from_directory(out_dir)
        for split in manifest["splits"]:
            for _ in builder.as_dataset(split=f"{split}[:1]").take(1):
                pass
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.tfds_meta", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="converted dataset folder (holds manifest.json)")
    args = parser.parse_args(argv)
    try:
        paths = write_tfds_metadata(args.data)
    except (ValueError, OSError) as err:  # DataError is a ValueError; one line that names the file
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"[tfds_meta] wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
