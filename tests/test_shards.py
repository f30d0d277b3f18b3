"""Shard writer: bad examples, --skip-bad, resuming after a kill, rebuilt shards, manifest checks."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_prep import shards
from mtl_sparse_jax.data import spec as data_spec
from mtl_sparse_jax.data.spec import DataError

SIZE = 12
NUM_CLASSES = 5


def make_example(key: str, broken: str = "") -> dict:
    """A random NYU-like example whose content depends only on the key (picklable: top level)."""
    rng = np.random.default_rng(int(key.split("-")[-1]))
    example = {
        "id": f"id-{key}",
        "image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "seg": rng.choice(np.array([0, 1, 2, 3, 4, 255], np.uint8), (SIZE, SIZE)),
        "depth": rng.uniform(0.0, 8.0, (SIZE, SIZE)).astype(np.float32),
        "normals": rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32),
        "edge": (rng.random((SIZE, SIZE)) < 0.2).astype(np.float32),
        "male": int(rng.integers(0, 2)),
    }
    if broken and key.endswith(broken.split(":")[0]):
        kind = broken.split(":")[1]
        if kind == "nan_depth":
            example["depth"][3, 4] = np.nan
        elif kind == "seg_range":
            example["seg"][0, 0] = NUM_CLASSES
        elif kind == "shape":
            example["depth"] = example["depth"][:, :-1].copy()
        elif kind == "dtype":
            example["depth"] = example["depth"].astype(np.float64)
        elif kind == "attribute":
            example["male"] = -1
    return example


def keys(n, prefix="k"):
    return [f"{prefix}-{i:03d}" for i in range(n)]


def write(out_dir, split_keys, builder=make_example, **kwargs):
    entry = shards.write_split(
        out_dir,
        "train",
        split_keys,
        builder,
        num_classes={"seg": NUM_CLASSES},
        **{"shard_size": 4, "num_workers": 0, **kwargs},
    )
    shards.write_manifest(
        out_dir,
        dataset="fake",
        source_layout="test",
        image_size=(SIZE, SIZE),
        features=entry["features"],
        num_classes={"seg": NUM_CLASSES},
        splits={"train": entry},
    )
    return entry


def file_identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("nan_depth", "NaN"),
        ("seg_range", "label(s) [5]"),
        ("shape", "shape"),
        ("dtype", "float64"),
        ("attribute", "male"),
    ],
)
def test_bad_example_raises_naming_the_key_and_skip_bad_records_it(tmp_path, kind, fragment):
    import functools

    builder = functools.partial(make_example, broken=f"005:{kind}")
    with pytest.raises(shards.BadExampleError) as info:
        write(str(tmp_path / "strict"), keys(7), builder)
    message = str(info.value)
    assert "k-005" in message and fragment in message and "\n" not in message
    assert not os.path.exists(tmp_path / "strict" / "manifest.json")

    entry = write(str(tmp_path / "lenient"), keys(7), builder, skip_bad=True)
    assert [s["key"] for s in entry["skipped"]] == ["k-005"]
    assert fragment in entry["skipped"][0]["error"]
    assert entry["num_examples"] == 6
    manifest = data_spec.load_manifest(str(tmp_path / "lenient"), verify="sha256")
    assert manifest["splits"]["train"]["skipped"][0]["key"] == "k-005"


def test_builder_exception_becomes_bad_example_error_naming_the_key(tmp_path):
    with pytest.raises(shards.BadExampleError, match="k-002.*FileNotFoundError"):
        write(str(tmp_path), keys(4), _missing_file_builder)


def _missing_file_builder(key):
    if key.endswith("002"):
        raise FileNotFoundError(f"/src/images/{key}.jpg")
    return make_example(key)


def test_examples_with_different_feature_sets_are_rejected(tmp_path):
    with pytest.raises(shards.BadExampleError, match="k-003.*same features"):
        write(str(tmp_path), keys(5), _drops_edge_at_3)


def _drops_edge_at_3(key):
    example = make_example(key)
    if key.endswith("003"):
        del example["edge"]
    return example


KILLED_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests_dir!r})
    import numpy as np
    from data_prep import shards
    import test_shards

    def dies_at_key_9(key):
        if key.endswith("009"):
            os._exit(17)  # a kill: no cleanup, no exception handlers
        return test_shards.make_example(key)

    shards.write_split({out!r}, "train", test_shards.keys(11), dies_at_key_9, shard_size=4, num_workers=0,
                       num_classes={{"seg": 5}})
""")


def test_resume_after_kill_keeps_finished_shards_and_gives_identical_output(tmp_path):
    reference_dir, resumed_dir = str(tmp_path / "reference"), str(tmp_path / "resumed")
    write(reference_dir, keys(11))
    # The directory already holds another finished dataset, which a killed rewrite must leave readable.
    write(resumed_dir, keys(11, prefix="old"))
    old = data_spec.load_manifest(resumed_dir, verify="sha256")

    script = KILLED_WRITER.format(tests_dir=os.path.dirname(__file__), out=resumed_dir)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 17, result.stderr

    assert data_spec.load_manifest(resumed_dir, verify="sha256") == old
    staging = shards.staging_dir(resumed_dir)
    names = sorted(os.listdir(staging))
    finished = ["train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord"]
    assert [n for n in names if n.endswith(".tfrecord")] == finished
    assert any(n.startswith(".train-00002-of-00003.tfrecord.") for n in names)  # the killed shard's temp file
    before = {n: file_identity(os.path.join(staging, n)) for n in finished}

    write(resumed_dir, keys(11))

    # The staged shards were moved in, not rebuilt (a rename keeps the inode and the mtime).
    assert {n: file_identity(os.path.join(resumed_dir, n)) for n in finished} == before
    assert not any(n.endswith(".tmp") for n in os.listdir(resumed_dir))
    assert not os.path.exists(staging)
    resumed = data_spec.load_manifest(resumed_dir, verify="sha256")
    reference = data_spec.load_manifest(reference_dir, verify="sha256")
    assert resumed["splits"] == reference["splits"]
    for shard in reference["splits"]["train"]["shards"]:
        with (
            open(os.path.join(reference_dir, shard["file"]), "rb") as a,
            open(os.path.join(resumed_dir, shard["file"]), "rb") as b,
        ):
            assert a.read() == b.read()


def test_truncated_shard_is_reported_and_rebuilt_by_a_rerun(tmp_path):
    out = str(tmp_path)
    entry = write(out, keys(9))
    victim = os.path.join(out, entry["shards"][1]["file"])
    untouched = os.path.join(out, entry["shards"][0]["file"])
    with open(victim, "r+b") as f:
        f.truncate(entry["shards"][1]["bytes"] // 2)
    with pytest.raises(DataError, match=os.path.basename(victim) + ".*truncated"):
        data_spec.load_manifest(out)
    before = file_identity(untouched)

    rebuilt = write(out, keys(9))

    assert rebuilt["shards"] == entry["shards"]
    assert file_identity(untouched) == before
    data_spec.load_manifest(out, verify="sha256")


def test_corrupted_shard_fails_the_checksum_naming_the_file(tmp_path):
    out = str(tmp_path)
    entry = write(out, keys(5))
    victim = os.path.join(out, entry["shards"][0]["file"])
    with open(victim, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))
    data_spec.load_manifest(out, verify="size")  # same size: only the checksum can tell
    with pytest.raises(DataError, match=os.path.basename(victim) + ".*sha256"):
        data_spec.load_manifest(out, verify="sha256")


def test_new_shard_size_replaces_the_old_shards(tmp_path):
    out = str(tmp_path)
    write(out, keys(9), shard_size=4)
    entry = write(out, keys(9), shard_size=5)
    on_disk = sorted(n for n in os.listdir(out) if n.endswith(".tfrecord"))
    assert (
        on_disk
        == sorted(s["file"] for s in entry["shards"])
        == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    )
    assert [s["num_examples"] for s in entry["shards"]] == [5, 4]


def test_manifest_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere.*does not exist.*data_prep.synthetic"):
        data_spec.load_manifest(missing)
    out = str(tmp_path / "data")
    entry = write(out, keys(5))
    manifest_path = os.path.join(out, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["splits"]["train"]["num_examples"] += 1
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(DataError, match="manifest.json.*add up"):
        data_spec.load_manifest(out)
    os.remove(os.path.join(out, entry["shards"][0]["file"]))
    os.remove(manifest_path)
    with pytest.raises(DataError, match="manifest.json not found"):
        data_spec.load_manifest(out)


@pytest.mark.slow
def test_worker_processes_write_the_same_shards_as_one_process(tmp_path):
    single = write(str(tmp_path / "one"), keys(10))
    parallel = write(str(tmp_path / "many"), keys(10), num_workers=2)
    assert parallel["shards"] == single["shards"]


def test_a_failed_rewrite_keeps_the_old_dataset_and_a_commit_cut_short_is_completed(tmp_path, monkeypatch):
    out, clean = str(tmp_path / "out"), str(tmp_path / "clean")
    write(out, keys(9, prefix="old"))
    old = data_spec.load_manifest(out, verify="sha256")
    import functools

    with pytest.raises(shards.BadExampleError, match="k-006"):
        write(out, keys(9), functools.partial(make_example, broken="006:nan_depth"))
    assert data_spec.load_manifest(out, verify="sha256") == old  # the old shards were not touched

    # A crash after the first staged shard was moved in: no manifest, so no reader takes the mix.
    real_replace, moved = os.replace, []

    def crash_after_one_shard(src, dst):
        if src.endswith(".tfrecord") and os.sep + shards.STAGING_DIR + os.sep in src:
            if moved:
                raise KeyboardInterrupt
            moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", crash_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        write(out, keys(9))
    monkeypatch.setattr(shards.os, "replace", real_replace)
    with pytest.raises(DataError, match="manifest.json not found"):
        data_spec.load_manifest(out)

    write(out, keys(9))
    write(clean, keys(9))
    assert data_spec.load_manifest(out, verify="sha256")["splits"] == data_spec.load_manifest(clean)["splits"]
    assert sorted(n for n in os.listdir(out) if n.endswith(".tfrecord")) == sorted(
        n for n in os.listdir(clean) if n.endswith(".tfrecord")
    )
