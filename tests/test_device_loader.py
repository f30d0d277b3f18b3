"""Device-resident loader against the tf.data loader over real shards: same batches (order and values), the resume
contract, per-process dealing, checked arrays (missing, corrupt, pickled), float16, and training without TF."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import subproc
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_prep import shards
from mtl_sparse_jax.data import device
from mtl_sparse_jax.data import pipeline as input_pipeline
from mtl_sparse_jax.data.spec import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 10
NUM_CLASSES = 4
NUM_TRAIN, NUM_VAL = 11, 7
ALL_TASKS = ["seg", "depth", "normals", "edge", "male", "smile"]


def make_example(key: str) -> dict:
    rng = np.random.default_rng(int(key.split("-")[-1]))
    depth = rng.uniform(0.5, 9.0, (SIZE, SIZE)).astype(np.float32)
    depth[rng.random((SIZE, SIZE)) < 0.1] = 0.0  # invalid pixels
    return {
        "id": key,
        "image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "seg": rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), (SIZE, SIZE)),
        "depth": depth,
        "normals": rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32),
        "edge": (rng.random((SIZE, SIZE)) < 0.3).astype(np.float32),
        "male": int(rng.integers(0, 2)),
        "smile": int(rng.integers(0, 2)),
    }


def write_dataset(out: str) -> str:
    splits = {}
    for split, offset, count in (("train", 0, NUM_TRAIN), ("val", 100, NUM_VAL)):
        keys = [f"{split}-{offset + i}" for i in range(count)]
        splits[split] = shards.write_split(
            out, split, keys, make_example, shard_size=4, num_workers=0, num_classes={"seg": NUM_CLASSES}
        )
    shards.write_manifest(
        out,
        dataset="fake",
        source_layout="test",
        image_size=(SIZE, SIZE),
        features=splits["train"]["features"],
        num_classes={"seg": NUM_CLASSES},
        splits=splits,
    )
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("shards")))


def sharding(num_devices: int) -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()[:num_devices]), ("data",)), P("data"))


def tf_batches(data_dir, split="train", **kwargs):
    options = dict(tasks=ALL_TASKS, batch_size=4, train=True, process_index=0, process_count=1, with_ids=True)
    options.update(kwargs)
    return list(input_pipeline.iterate_batches(data_dir, split, cache=True, **options))


def device_batches(data_dir, split="train", num_devices=2, **kwargs):
    options = dict(tasks=ALL_TASKS, batch_size=4, train=True, process_index=0, process_count=1, with_ids=True)
    options.update(kwargs)
    return list(device.iterate_batches(data_dir, split, sharding=sharding(num_devices), **options))


def assert_same_batches(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            if key == "id":
                assert list(g[key]) == list(w[key])
                continue
            assert isinstance(g[key], jax.Array) and g[key].sharding.spec[0] == "data", key
            value = np.asarray(g[key])
            assert value.dtype == w[key].dtype and value.shape == w[key].shape, key
            np.testing.assert_array_equal(value, w[key], err_msg=key)


@pytest.mark.parametrize("depth_norm", ["reference", "fixed", "none"])
def test_training_batches_equal_the_tfdata_loader(data_dir, depth_norm):
    kwargs = dict(seed=3, epoch=5, depth_norm=depth_norm, depth_max_m=4.0)
    assert_same_batches(device_batches(data_dir, **kwargs), tf_batches(data_dir, **kwargs))


def test_evaluation_batches_equal_the_tfdata_loader_with_padding(data_dir):
    got = device_batches(data_dir, "val", train=False)
    assert_same_batches(got, tf_batches(data_dir, "val", train=False))
    last = got[-1]  # 7 examples in batches of 4: the last one has 3 real and 1 padding example
    np.testing.assert_array_equal(np.asarray(last["weight"]), [1, 1, 1, 0])
    assert np.all(np.asarray(last["seg"])[3] == 255) and np.all(np.asarray(last["image"])[3] == 0)
    assert last["id"][3] == b""


def test_processes_are_dealt_the_same_examples_as_tfdata(data_dir):
    for p in range(2):
        kwargs = dict(batch_size=2, seed=1, epoch=2, process_index=p, process_count=2)
        assert_same_batches(device_batches(data_dir, **kwargs), tf_batches(data_dir, **kwargs))
        kwargs["train"] = False
        assert_same_batches(device_batches(data_dir, "val", **kwargs), tf_batches(data_dir, "val", **kwargs))


def ids_of(batch_list):
    return [i for b in batch_list for i in b["id"]]


def test_resumed_epoch_sees_the_same_batches(data_dir):
    run = [device_batches(data_dir, seed=7, epoch=e) for e in range(3)]
    device.clear_cache()  # a new process: nothing resident
    resumed = device_batches(data_dir, seed=7, epoch=2)
    assert ids_of(resumed) == ids_of(run[2])
    for a, b in zip(resumed, run[2]):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert ids_of(run[0]) != ids_of(run[1]) != ids_of(run[2])
    assert len(set(ids_of(run[1]))) == len(ids_of(run[1])) == (NUM_TRAIN // 4) * 4


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_arrays_are_written_once_with_their_checksums(data_dir):
    device_batches(data_dir, tasks=["seg"])
    sidecar = json.load(open(os.path.join(data_dir, device.ARRAYS_NAME)))
    arrays = sidecar["splits"]["train"]["arrays"]
    assert set(arrays) == {"image", "seg", "depth", "normals", "edge", "male", "smile", "id"}
    for info in arrays.values():
        path = os.path.join(data_dir, info["file"])
        assert info["sha256"] == sha256(path) and info["bytes"] == os.path.getsize(path)
    assert not [f for f in os.listdir(os.path.join(data_dir, device.ARRAYS_DIR)) if ".tmp" in f]
    image = np.load(os.path.join(data_dir, arrays["image"]["file"]), allow_pickle=False)
    assert image.dtype == np.uint8 and image.shape == (NUM_TRAIN, SIZE, SIZE, 3)
    np.testing.assert_array_equal(image[3], make_example("train-3")["image"])  # manifest order


@pytest.fixture()
def own_copy(data_dir, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(data_dir, out)
    device.prepare_split(out, "train")
    device.clear_cache()
    yield out
    device.clear_cache()


def one_line_error(out, match):
    with pytest.raises(DataError) as info:
        device_batches(out)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def test_missing_array_names_the_file(own_copy):
    path = os.path.join(own_copy, device.ARRAYS_DIR, "train.seg.npy")
    os.remove(path)
    assert "missing" in one_line_error(own_copy, path)


def test_corrupted_array_names_the_file(own_copy):
    path = os.path.join(own_copy, device.ARRAYS_DIR, "train.normals.npy")
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert "sha256" in one_line_error(own_copy, path)
    open(path, "wb").write(bytes(data[:-8]))
    assert "truncated" in one_line_error(own_copy, path)


def test_pickled_array_is_refused(own_copy):
    """An object array whose checksum is recorded correctly still needs pickle to load, and is refused."""
    path = os.path.join(own_copy, device.ARRAYS_DIR, "train.id.npy")
    np.save(path, np.array([f"train-{i}" for i in range(NUM_TRAIN)], dtype=object), allow_pickle=True)
    sidecar_path = os.path.join(own_copy, device.ARRAYS_NAME)
    sidecar = json.load(open(sidecar_path))
    info = sidecar["splits"]["train"]["arrays"]["id"]
    info.update(sha256=sha256(path), bytes=os.path.getsize(path), dtype="|O")
    json.dump(sidecar, open(sidecar_path, "w"))
    assert "pickle" in one_line_error(own_copy, path)


def test_stale_arrays_are_decoded_again_when_the_shards_change(own_copy):
    sidecar_path = os.path.join(own_copy, device.ARRAYS_NAME)
    sidecar = json.load(open(sidecar_path))
    sidecar["splits"]["train"]["shards"][0][1] = "0" * 64  # as if the arrays came from other shards
    json.dump(sidecar, open(sidecar_path, "w"))
    assert_same_batches(device_batches(own_copy, seed=2), tf_batches(own_copy, seed=2))
    assert json.load(open(sidecar_path))["splits"]["train"]["shards"][0][1] != "0" * 64


def test_float16_tables_cost_only_their_rounding(data_dir):
    want = tf_batches(data_dir, seed=4, depth_norm="fixed")
    got = device_batches(data_dir, seed=4, depth_norm="fixed", float_dtype="float16")
    for g, w in zip(got, want):
        for key in ("depth", "normals", "edge"):
            rounded = w[key].astype(np.float16).astype(np.float32)  # independent: numpy's round-to-nearest
            np.testing.assert_array_equal(np.asarray(g[key]), rounded, err_msg=key)
            assert np.max(np.abs(np.asarray(g[key]) - w[key])) <= 2.0**-12  # half an ulp of float16 on [-1, 1]
        np.testing.assert_array_equal(np.asarray(g["image"]), w["image"])


def test_bad_arguments_are_refused_before_the_first_batch(data_dir):
    with pytest.raises(ValueError, match="PartitionSpec"):
        device.iterate_batches(data_dir, "train", tasks=["seg"], batch_size=2, train=True, sharding=None)
    with pytest.raises(DataError, match="fewer than one batch"):
        device.iterate_batches(data_dir, "val", tasks=["seg"], batch_size=8, train=True, sharding=sharding(1))


# --------------------------------------------------------------------------------------------------
# Training in a process where TensorFlow cannot be imported

NO_TF_TRAIN = r"""
import json, os, sys
sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import tiny_config
from mtl_sparse_jax import training as train
config = tiny_config.get_config()
config.data.dir, config.data.loader, config.steps_per_epoch = sys.argv[2], "device", 3
train.train_and_evaluate(config, sys.argv[3])
try:
    import tensorflow
    raise SystemExit("tensorflow was importable")
except ImportError:
    pass
assert not [m for m in sys.modules if m.startswith("tensorflow") and sys.modules[m] is not None]
"""


def epoch_losses(workdir):
    with open(os.path.join(workdir, "trial_0", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["split"], r["epoch"], r["loss/total"]) for r in records]


@pytest.mark.slow
def test_training_without_tensorflow_matches_the_tfdata_loader(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny_config

    from data_prep import synthetic
    from mtl_sparse_jax import training as train

    data = str(tmp_path / "data")
    synthetic.generate(data, num_train=32, num_val=8, num_test=8, image_size=32, num_classes=6)
    for split in ("train", "val", "test"):
        device.prepare_split(data, split)  # the arrays are decoded here, where TensorFlow exists

    config = tiny_config.get_config()
    config.data.dir, config.data.loader, config.steps_per_epoch = data, "tfdata", 3
    train.train_and_evaluate(config, str(tmp_path / "tfdata"))

    # 8 devices, as this process: a 1-device process sums in another order, which shows after two epochs.
    env = subproc.device_env(8, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-c", NO_TF_TRAIN, ROOT, data, str(tmp_path / "device")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = epoch_losses(tmp_path / "tfdata"), epoch_losses(tmp_path / "device")
    assert [w[:2] for w in want] == [g[:2] for g in got] == [("train", 0), ("val", 0), ("train", 1), ("val", 1)]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-6)
    test_want = json.load(open(tmp_path / "tfdata" / "trial_0" / "test_metrics.json"))
    test_got = json.load(open(tmp_path / "device" / "trial_0" / "test_metrics.json"))
    np.testing.assert_allclose(test_got["loss/total"], test_want["loss/total"], rtol=1e-6)


def test_resident_bytes_and_fits_follow_the_arrays_and_the_device_limit(data_dir, monkeypatch):
    pixels = NUM_TRAIN * SIZE * SIZE
    # image 3 + seg 1 + depth 4 + depth_valid 1 + normals 12 + edge 4 bytes per pixel; depth_scale 4 and two
    # attributes 1 byte each per example.
    want = pixels * (3 + 1 + 4 + 1 + 12 + 4) + NUM_TRAIN * (4 + 1 + 1)
    assert device.resident_bytes(data_dir, "train", ALL_TASKS) == want
    batch = device_batches(data_dir, batch_size=2)[0]
    placed = device._CACHE[next(reversed(device._CACHE))]["tables"]
    assert sum(t.nbytes for t in placed.values()) == want and "id" in batch
    half = device.resident_bytes(data_dir, "train", ALL_TASKS, float_dtype="float16")
    assert half == want - pixels * (2 + 6 + 2)
    mesh = sharding(2).mesh
    monkeypatch.setattr(device, "_device_limit", lambda d: 2 * want)
    assert device.fits(data_dir, "train", ALL_TASKS, mesh)
    monkeypatch.setattr(device, "_device_limit", lambda d: 2 * want - 1)
    assert not device.fits(data_dir, "train", ALL_TASKS, mesh)
    with pytest.raises(DataError, match="data.loader=tfdata"):
        device_batches(data_dir, seed=99, depth_norm="none")  # another depth_norm: not cached, so checked
