"""Input pipeline over real shards: exact round trip, order, per-process sharding, padding, depth options, errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import shards
from mtl_sparse_jax.data import pipeline as input_pipeline
from mtl_sparse_jax.data.spec import DataError

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    splits = {}
    for split, offset, count in (("train", 0, NUM_TRAIN), ("val", 100, NUM_VAL)):
        split_keys = [f"{split}-{offset + i}" for i in range(count)]
        splits[split] = shards.write_split(
            out, split, split_keys, make_example, shard_size=4, num_workers=0, num_classes={"seg": NUM_CLASSES}
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


def batches(data_dir, split="train", **kwargs):
    options = dict(tasks=ALL_TASKS, batch_size=3, train=True, process_index=0, process_count=1, with_ids=True)
    options.update(kwargs)
    return list(input_pipeline.iterate_batches(data_dir, split, **options))


def real_ids(batch_list):
    return [i.decode() for b in batch_list for i, w in zip(b["id"], b["weight"]) if w == 1]


@pytest.mark.parametrize("cache", [True, False])
def test_round_trip_is_exact(data_dir, cache):
    got = batches(data_dir, "val", train=False, depth_norm="none", cache=cache)
    assert real_ids(got) == [f"val-{100 + i}" for i in range(NUM_VAL)]
    flat = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
    for row, key in enumerate(real_ids(got)):
        want = make_example(key)
        np.testing.assert_array_equal(flat["image"][row], want["image"].astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(flat["seg"][row], want["seg"].astype(np.int32))
        np.testing.assert_array_equal(flat["depth"][row, ..., 0], want["depth"])
        np.testing.assert_array_equal(flat["depth_valid"][row, ..., 0], (want["depth"] > 0).astype(np.float32))
        np.testing.assert_array_equal(flat["normals"][row], want["normals"])
        np.testing.assert_array_equal(flat["edge"][row, ..., 0], want["edge"])
        assert flat["male"][row] == want["male"] and flat["smile"][row] == want["smile"]
        assert flat["depth_scale"][row] == 1.0


def test_batch_arrays_follow_the_contract(data_dir):
    batch = batches(data_dir, batch_size=2)[0]
    expected = {
        "image": ((2, SIZE, SIZE, 3), np.float32),
        "seg": ((2, SIZE, SIZE), np.int32),
        "depth": ((2, SIZE, SIZE, 1), np.float32),
        "depth_valid": ((2, SIZE, SIZE, 1), np.float32),
        "depth_scale": ((2,), np.float32),
        "normals": ((2, SIZE, SIZE, 3), np.float32),
        "edge": ((2, SIZE, SIZE, 1), np.float32),
        "male": ((2,), np.float32),
        "smile": ((2,), np.float32),
        "weight": ((2,), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k != "id"} == expected
    assert np.all(batch["weight"] == 1) and 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_only_the_requested_tasks_are_loaded(data_dir):
    seg_only = batches(data_dir, tasks=["seg"], with_ids=False)[0]
    assert set(seg_only) == {"image", "seg", "weight"}
    depth_only = batches(data_dir, tasks=["depth"], with_ids=False)[0]
    assert set(depth_only) == {"image", "depth", "depth_valid", "depth_scale", "weight"}


@pytest.mark.parametrize("cache", [True, False])
def test_training_order_depends_only_on_seed_and_epoch(data_dir, cache):
    first = real_ids(batches(data_dir, seed=3, epoch=5, cache=cache))
    again = real_ids(batches(data_dir, seed=3, epoch=5, cache=cache))
    next_epoch = real_ids(batches(data_dir, seed=3, epoch=6, cache=cache))
    other_seed = real_ids(batches(data_dir, seed=4, epoch=5, cache=cache))
    steps = input_pipeline.steps_per_epoch(data_dir, "train", 3, train=True)
    assert first == again
    assert len(first) == len(set(first)) == steps * 3 == (NUM_TRAIN // 3) * 3
    assert set(first) <= {f"train-{i}" for i in range(NUM_TRAIN)}
    assert next_epoch != first and other_seed != first


@pytest.mark.parametrize("cache", [True, False])
def test_processes_get_disjoint_examples_and_evaluation_covers_each_once(data_dir, cache):
    steps = input_pipeline.steps_per_epoch(data_dir, "train", 2, train=True, process_count=2)
    train = [
        batches(data_dir, batch_size=2, seed=1, epoch=2, process_index=p, process_count=2, cache=cache)
        for p in range(2)
    ]
    assert [len(b) for b in train] == [steps, steps]
    ids = [real_ids(b) for b in train]
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0])) == len(ids[0]) == 2 * steps

    eval_steps = input_pipeline.steps_per_epoch(data_dir, "val", 2, train=False, process_count=2)
    evaluation = [
        batches(data_dir, "val", batch_size=2, train=False, process_index=p, process_count=2, cache=cache)
        for p in range(2)
    ]
    assert [len(b) for b in evaluation] == [eval_steps, eval_steps]
    seen = real_ids(evaluation[0]) + real_ids(evaluation[1])
    assert sorted(seen) == sorted(f"val-{100 + i}" for i in range(NUM_VAL))  # each example exactly once
    weights = np.concatenate([b["weight"] for part in evaluation for b in part])
    assert weights.sum() == NUM_VAL and set(np.unique(weights)) <= {0.0, 1.0}


@pytest.mark.parametrize("cache", [True, False])
def test_last_evaluation_batch_is_padded_with_weight_zero(data_dir, cache):
    got = batches(data_dir, "val", batch_size=3, train=False, cache=cache)
    assert len(got) == input_pipeline.steps_per_epoch(data_dir, "val", 3, train=False) == -(-NUM_VAL // 3)
    assert all(b["weight"].shape == (3,) for b in got)
    last = got[-1]
    real = NUM_VAL - 3 * (len(got) - 1)
    np.testing.assert_array_equal(last["weight"], [1.0] * real + [0.0] * (3 - real))
    assert np.all(last["seg"][real:] == 255) and np.all(last["depth_valid"][real:] == 0)
    assert np.all(last["image"][real:] == 0) and list(last["id"][real:]) == [b""] * (3 - real)


def reference_depth_normalisation(depth):
    """The authors' loader, in plain numpy (float64): divide by the max, clip to [0.1, p99 of the result]."""
    divided = depth.astype(np.float64) / depth.max()
    p99 = min(300, np.percentile(divided, 99))
    return np.clip(divided, 0.1, p99), depth.max()


@pytest.mark.parametrize("cache", [True, False])
def test_depth_normalisation_options(data_dir, cache):
    keys = [f"val-{100 + i}" for i in range(NUM_VAL)]
    stored = np.stack([make_example(k)["depth"] for k in keys])
    reference = batches(data_dir, "val", train=False, cache=cache, depth_norm="reference", batch_size=NUM_VAL)[0]
    for row, depth in enumerate(stored):
        want, scale = reference_depth_normalisation(depth)
        np.testing.assert_allclose(reference["depth"][row, ..., 0], want, rtol=1e-6, atol=0)
        assert reference["depth_scale"][row] == np.float32(scale)
    np.testing.assert_array_equal(reference["depth_valid"][..., 0], (stored > 0).astype(np.float32))

    fixed = batches(data_dir, "val", train=False, cache=cache, depth_norm="fixed", depth_max_m=4.0, batch_size=NUM_VAL)[
        0
    ]
    np.testing.assert_allclose(fixed["depth"][..., 0], np.clip(stored / 4.0, 0, 1), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(fixed["depth_scale"], np.full(NUM_VAL, 4.0, np.float32))


def test_task_missing_from_the_dataset_names_task_dir_and_available_tasks(tmp_path):
    out = str(tmp_path)
    entry = shards.write_split(out, "train", ["a-1", "a-2"], attribute_example, num_workers=0)
    shards.write_manifest(
        out,
        dataset="faces",
        source_layout="test",
        image_size=(SIZE, SIZE),
        features=entry["features"],
        num_classes={},
        splits={"train": entry},
    )
    with pytest.raises(DataError) as info:
        input_pipeline.make_dataset(
            out, "train", tasks=["male", "depth"], batch_size=1, train=True, process_index=0, process_count=1
        )
    message = str(info.value)
    assert "'depth'" in message and out in message and "['male']" in message
    with pytest.raises(DataError, match="'depth'"):  # raised by the call itself, before any batch is drawn
        input_pipeline.iterate_batches(
            out, "train", tasks=["depth"], batch_size=1, train=True, process_index=0, process_count=1
        )
    with pytest.raises(DataError, match="split 'test'"):
        input_pipeline.make_dataset(
            out, "test", tasks=["male"], batch_size=1, train=True, process_index=0, process_count=1
        )


def attribute_example(key):
    example = make_example(key)
    return {"id": key, "image": example["image"], "male": example["male"]}


def test_damaged_shards_give_data_errors_naming_the_file(data_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(data_dir, copy)
    victim = os.path.join(copy, "val-00001-of-00002.tfrecord")
    with open(victim, "r+b") as f:  # flip bytes inside a record: same size, bad CRC
        f.seek(60)
        chunk = f.read(8)
        f.seek(60)
        f.write(bytes(b ^ 0x5A for b in chunk))
    with pytest.raises(DataError, match="val-00001-of-00002.tfrecord.*sha256"):
        batches(copy, "val", train=False, cache=False)
    with pytest.raises(DataError, match="val-00001-of-00002.tfrecord.*sha256"):
        batches(copy, "val", train=False, cache=True)

    with open(victim, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="val-00001-of-00002.tfrecord.*truncated"):
        input_pipeline.make_dataset(
            copy, "val", tasks=["seg"], batch_size=2, train=False, process_index=0, process_count=1
        )
    os.remove(os.path.join(copy, "manifest.json"))
    with pytest.raises(DataError, match="manifest.json not found"):
        input_pipeline.make_dataset(
            copy, "val", tasks=["seg"], batch_size=2, train=False, process_index=0, process_count=1
        )


def test_too_few_examples_for_one_training_batch_is_a_clear_error(data_dir):
    with pytest.raises(DataError, match="fewer than one batch"):
        input_pipeline.make_dataset(
            data_dir, "val", tasks=["seg"], batch_size=8, train=True, process_index=0, process_count=1
        )


def test_importing_the_package_does_not_import_tensorflow():
    code = (
        "import sys, mtl_sparse_jax, mtl_sparse_jax.data.spec, mtl_sparse_jax.data.pipeline; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
