"""TFDS interoperability: converted datasets read by tensorflow-datasets, and tfds datasets read by our pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_prep_celeba import make_release
from test_prep_nyu import make_nyud_mt

from data_prep import celeba, nyu, synthetic
from data_prep import inspect as prep_inspect
from mtl_sparse_jax.data import pipeline
from mtl_sparse_jax.data.spec import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


# ----------------------------------------------------------------------------- converted data, read through tfds


def assert_tfds_equals_inspect(out_dir):
    """Every feature of every example of every split, from tfds.builder_from_directory, against data_prep.inspect."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    height, width = manifest["image_size"]
    builder = _tfds().builder_from_directory(out_dir)
    assert set(builder.info.features.keys()) == set(manifest["features"]) | {"id"}
    assert set(builder.info.splits.keys()) == set(manifest["splits"])
    for split, entry in manifest["splits"].items():
        examples = list(builder.as_dataset(split=split).as_numpy_iterator())
        assert len(examples) == entry["num_examples"] == builder.info.splits[split].num_examples
        for index, ex in enumerate(examples):
            ref = prep_inspect.load_example(out_dir, split, index, depth_norm="none")
            assert ex["id"].decode() == str(ref["id"])
            for name in manifest["features"]:
                got, want = ex[name], ref[name]
                if name == "image":
                    assert got.dtype == np.uint8 and got.shape == (height, width, 3)
                    np.testing.assert_array_equal(got.astype(np.float32) / np.float32(255), want)
                elif name == "seg":
                    assert got.dtype == np.uint8 and got.shape == (height, width, 1)
                    np.testing.assert_array_equal(got[..., 0].astype(np.int32), want)
                elif name in ("depth", "edge"):
                    assert got.dtype == np.float32 and got.shape == (height, width)
                    np.testing.assert_array_equal(got, want[..., 0])
                elif name == "normals":
                    assert got.dtype == np.float32 and got.shape == (height, width, 3)
                    np.testing.assert_array_equal(got, want)
                else:  # attributes: ClassLabel int64 in {0, 1}
                    assert got.dtype == np.int64 and got.shape == () and got in (0, 1)
                    assert float(got) == float(want)
            if "depth" in manifest["features"]:
                np.testing.assert_array_equal(ref["depth_valid"][..., 0], (ex["depth"] > 0).astype(np.float32))
    assert not [n for n in os.listdir(out_dir) if n.startswith(".tfds_meta")]  # the staging folder is gone
    return builder, manifest


def test_converted_nyud_mt_reads_through_tfds_as_inspect_yields(tmp_path):
    root = str(tmp_path / "raw")
    make_nyud_mt(root, {"train": ["a0", "a1", "a2"], "val": ["v0"], "test": ["t0", "t1", "t2"]})
    out = str(tmp_path / "out")
    nyu.convert(root, out, size=8, shard_size=2, workers=0, log=lambda *_: None)
    builder, manifest = assert_tfds_equals_inspect(out)
    assert sorted(manifest["features"]) == ["depth", "edge", "image", "normals", "seg"]
    assert [e["id"].decode() for e in builder.as_dataset(split="test").as_numpy_iterator()] == ["t0", "t1", "t2"]
    features = json.loads((tmp_path / "out" / "features.json").read_text())["featuresDict"]["features"]
    assert features["depth"]["tensor"]["encoding"] == "bytes"  # raw float32 bytes, described as they are
    assert features["seg"]["image"]["shape"]["dimensions"] == ["8", "8", "1"]


def test_converted_celebamask_hq_reads_through_tfds_as_inspect_yields(tmp_path):
    root = str(tmp_path / "raw")
    make_release(root)
    out = str(tmp_path / "out")
    celeba.convert(root, out, size=8, shard_size=2, workers=0, seed=0, log=lambda *_: None)
    builder, manifest = assert_tfds_equals_inspect(out)
    assert sorted(manifest["features"]) == ["eyebrows", "glasses", "image", "male", "seg", "smile"]
    assert builder.info.features["male"].num_classes == 2


# --------------------------------------------------------------------- our pipeline on a tfds directory we wrote


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("synthetic"))
    # Shards longer than tfds's default interleave block (16): without ordered metadata tfds would mix them.
    synthetic.generate(d, num_train=41, num_val=3, num_test=5, image_size=8, shard_size=18, num_classes=4)
    return d


def _batches(d, split, **kw):
    args = dict(tasks=["seg", "depth", "normals", "edge"], batch_size=4, with_ids=True, seed=5, epoch=2)
    args.update(kw)
    return list(pipeline.iterate_batches(d, split, **args))


def test_tfds_default_order_is_the_manifest_order(synthetic_dir):
    builder = _tfds().builder_from_directory(synthetic_dir)
    assert builder.info.disable_shuffling
    ids = [e["id"] for e in builder.as_dataset(split="train").as_numpy_iterator()]
    want = [i for b in _batches(synthetic_dir, "train", train=False, batch_size=1) for i in b["id"]]
    assert ids == want and len(ids) == 41 and len(set(ids)) == 41


@pytest.mark.parametrize(
    "train,cache,process_index,process_count",
    [
        (False, True, 0, 1),
        (False, False, 0, 1),
        (True, True, 0, 1),
        (False, True, 1, 2),
        (False, False, 1, 2),
        (True, True, 1, 2),
    ],
)
def test_tfds_format_yields_the_shards_batches(synthetic_dir, train, cache, process_index, process_count):
    """Same keys, dtypes, values, order and padding as the TFRecord path, on the same examples."""
    layout = dict(train=train, cache=cache, process_index=process_index, process_count=process_count)
    ours = _batches(synthetic_dir, "train", **layout)
    via_tfds = _batches(synthetic_dir, "train", data_format="tfds", **layout)
    assert (
        len(ours)
        == len(via_tfds)
        == pipeline.steps_per_epoch(
            synthetic_dir, "train", 4, train=train, process_count=process_count, data_format="tfds"
        )
    )
    for a, b in zip(ours, via_tfds):
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_tfds_streaming_training_is_seeded_and_disjoint(synthetic_dir):
    def epoch(process_index, seed=5):
        batches = _batches(
            synthetic_dir,
            "train",
            data_format="tfds",
            train=True,
            cache=False,
            process_index=process_index,
            process_count=2,
            seed=seed,
        )
        return [i for b in batches for i in b["id"]]

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert first == again  # the order depends on (seed, epoch) only
    assert len(first) == len(other) == 20 and not set(first) & set(other)
    assert epoch(0, seed=6) != first


# ------------------------------------------------------------ a tfds dataset that our converters did not write

SIZE = 32
NAMES = {"image": "rgb", "seg": "segmentation", "depth": "depth_m", "normals": "surface_normals"}


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory):
    """Written by tfds's SequentialWriter from numpy arrays, with its own feature names and encodings."""
    tfds = _tfds()
    features = tfds.features.FeaturesDict(
        {
            "rgb": tfds.features.Image(shape=(SIZE, SIZE, 3)),
            "segmentation": tfds.features.Tensor(shape=(SIZE, SIZE), dtype=np.int32),
            "depth_m": tfds.features.Tensor(shape=(SIZE, SIZE, 1), dtype=np.float32, encoding="zlib"),
            "surface_normals": tfds.features.Tensor(shape=(SIZE, SIZE, 3), dtype=np.float32),
            "caption": tfds.features.Text(),
        }
    )
    data_dir = str(tmp_path_factory.mktemp("tfds") / "toy_scenes" / "1.0.0")
    os.makedirs(data_dir)
    info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(
            name="toy_scenes", version=tfds.core.Version("1.0.0"), data_dir=data_dir, module_name=""
        ),
        features=features,
        description="toy multi-task scenes",
    )
    arrays = {}
    for split, count in (("train", 16), ("val", 5), ("test", 7)):
        arrays[split] = []
        for index in range(count):
            scene = synthetic.build_example(f"s3-{split}-{index:06d}", seed=3, image_size=SIZE, num_classes=6)
            arrays[split].append(
                {
                    "rgb": scene["image"],
                    "segmentation": scene["seg"].astype(np.int32),
                    "depth_m": scene["depth"][..., None],
                    "surface_normals": scene["normals"],
                    "caption": f"{split} scene {index}",
                }
            )
    writer = tfds.core.SequentialWriter(ds_info=info, max_examples_per_shard=3)
    writer.initialize_splits(list(arrays))
    writer.add_examples(arrays)
    writer.close_all()
    assert not os.path.exists(os.path.join(data_dir, "manifest.json"))
    return data_dir, arrays


def test_tfds_batches_hold_the_written_arrays(foreign_dir):
    data_dir, arrays = foreign_dir
    from mtl_sparse_jax.data import tfds_source

    described = tfds_source.describe(data_dir, NAMES)
    assert described["image_size"] == [SIZE, SIZE]
    assert described["features"] == ["image", "seg", "depth", "normals"]
    batches = _batches(
        data_dir,
        "test",
        tasks=["seg", "depth", "normals"],
        train=False,
        batch_size=3,
        depth_norm="none",
        data_format="tfds",
        features=NAMES,
        process_index=0,
        process_count=1,
    )
    assert len(batches) == 3  # 7 examples: 3 + 3 + 1 and 2 padding
    weight = np.concatenate([b["weight"] for b in batches])
    np.testing.assert_array_equal(weight, [1] * 7 + [0] * 2)
    got = {k: np.concatenate([b[k] for b in batches])[:7] for k in batches[0]}
    want = arrays["test"]
    np.testing.assert_array_equal(got["image"], np.stack([w["rgb"] for w in want]).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(got["seg"], np.stack([w["segmentation"] for w in want]))
    np.testing.assert_array_equal(got["depth"], np.stack([w["depth_m"] for w in want]))
    np.testing.assert_array_equal(got["depth_valid"], (got["depth"] > 0).astype(np.float32))
    np.testing.assert_array_equal(got["normals"], np.stack([w["surface_normals"] for w in want]))
    padding = np.concatenate([b["seg"] for b in batches])[7:]
    assert got["seg"].dtype == np.int32 and np.all(padding == 255)
    assert len({bytes(i) for i in got["id"]}) == 7  # tfds's own example ids: the dataset has no 'id'


def test_tfds_errors_name_the_feature_and_the_fix(foreign_dir, synthetic_dir, tmp_path):
    data_dir, _ = foreign_dir
    kw = dict(tasks=["seg"], batch_size=2, train=False, data_format="tfds", process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"no feature 'image' for data.features.image.*'rgb'"):
        pipeline.make_dataset(data_dir, "test", **kw)
    with pytest.raises(DataError, match=r"no feature 'seg' for data.features.seg.*leave task 'seg' out"):
        pipeline.make_dataset(data_dir, "test", features={"image": "rgb"}, **kw)
    with pytest.raises(DataError, match=r"'rgb' \(data.features.seg\) has shape \(32, 32, 3\)"):
        pipeline.make_dataset(data_dir, "test", features={"image": "rgb", "seg": "rgb"}, **kw)
    with pytest.raises(DataError, match=r"'caption' \(data.features.depth\) has shape \(\) object"):
        pipeline.make_dataset(data_dir, "test", features=dict(NAMES, depth="caption"), **{**kw, "tasks": ["depth"]})
    with pytest.raises(DataError, match=r"split 'valid' is not in the tfds dataset"):
        pipeline.make_dataset(data_dir, "valid", features=NAMES, **kw)
    with pytest.raises(DataError, match=r"data.verify='sha256' needs checksums"):
        pipeline.make_dataset(data_dir, "test", features=NAMES, verify="sha256", **kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"dataset_info.json not found: .* is not a tfds dataset directory"):
        pipeline.make_dataset(str(empty), "train", **kw)
    # Our own directories carry checksums: sha256 verification works there.
    assert pipeline.make_dataset(synthetic_dir, "test", verify="sha256", **kw) is not None


def test_shards_without_tfds_metadata_get_it_from_the_cli(tmp_path, capsys):
    from data_prep import tfds_meta

    d = str(tmp_path / "old")
    synthetic.generate(d, num_train=3, num_val=1, num_test=2, image_size=8, num_classes=4)
    for name in tfds_meta.TFDS_FILES:  # as an older version of the converters left it
        os.remove(os.path.join(d, name))
    kw = dict(tasks=["seg"], batch_size=1, train=False, data_format="tfds", process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"without tfds metadata.*python -m data_prep.tfds_meta --data"):
        pipeline.make_dataset(d, "test", **kw)
    assert tfds_meta.main(["--data", d]) == 0
    assert [b["id"][0] for b in _batches(d, "test", **kw, with_ids=True)] == [
        b["id"][0] for b in _batches(d, "test", **{**kw, "data_format": "shards"}, with_ids=True)
    ]
    assert tfds_meta.main(["--data", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_config_fields_for_tfds():
    from configs import default
    from mtl_sparse_jax import config_utils
    from mtl_sparse_jax.data import tfds_source

    config = default.get_config()
    assert sorted(config.data.features) == sorted(tfds_source.OUR_FEATURES)
    assert tfds_source.feature_names(config.data.features) == {n: n for n in tfds_source.OUR_FEATURES}
    config.data.format = "tfrecords"
    with pytest.raises(config_utils.ConfigError, match=r"'data.format'.*\['shards', 'tfds'\]"):
        config_utils.validate(config)
    config = default.get_config()
    config.data.features.sgm = "x"
    with pytest.raises(config_utils.ConfigError, match=r"unknown config key 'data.features.sgm'"):
        config_utils.validate(config)


@pytest.mark.slow
def test_one_epoch_trains_from_a_tfds_directory(foreign_dir, tmp_path):
    import tiny_config

    from mtl_sparse_jax import training as train

    data_dir, _ = foreign_dir
    config = tiny_config.get_config()
    config.data.dir = data_dir
    config.data.format = "tfds"
    for ours, name in NAMES.items():
        config.data.features[ours] = name
    config.num_epochs = 1
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "trial_0" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [(r["epoch"], r["split"]) for r in records] == [(0, "train"), (0, "val")]
    assert len(results) == 1
    for key in ("seg/miou", "normals/angle_mean", "depth/mae_paper"):
        assert np.isfinite(results[0][key]), key
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["format"] == "tfds" and saved["data"]["features"]["image"] == "rgb"


# ----------------------------------------------------------------------------------------------- import hygiene


def test_package_import_does_not_import_tfds_or_tensorflow():
    code = (
        "import importlib, pkgutil, sys\n"
        "import mtl_sparse_jax\n"
        "from mtl_sparse_jax.data import pipeline, tfds_source\n"
        "for m in pkgutil.walk_packages(mtl_sparse_jax.__path__, 'mtl_sparse_jax.'):\n"
        "    importlib.import_module(m.name)\n"
        "import configs.default\n"
        "print(sorted(k for k in ('tensorflow', 'tensorflow_datasets') if k in sys.modules))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
