"""data_prep.inspect: one example written to npz exactly as the input pipeline yields it."""

import os

import numpy as np
import pytest

from data_prep import inspect as prep_inspect
from data_prep.shards import write_manifest, write_split

SIZE = 8


def build_example(key):
    """Deterministic stored example number `key` (uint8 image, labels with ignore, metric depth with holes)."""
    rng = np.random.default_rng(int(key))
    depth = rng.uniform(0.5, 6.0, (SIZE, SIZE)).astype(np.float32)
    depth[0, : int(key) + 1] = 0.0  # invalid pixels
    normals = rng.normal(size=(SIZE, SIZE, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    seg = rng.integers(0, 40, (SIZE, SIZE)).astype(np.uint8)
    seg[1, 1] = 255
    return {
        "id": f"ex{key}",
        "image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "seg": seg,
        "depth": depth,
        "normals": normals.astype(np.float32),
        "edge": (rng.uniform(size=(SIZE, SIZE)) > 0.5).astype(np.float32),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inspect_data"))
    entry = write_split(
        out,
        "val",
        [str(i) for i in range(5)],
        build_example,
        shard_size=2,
        num_workers=0,
        image_size=(SIZE, SIZE),
        num_classes={"seg": 40},
    )
    write_manifest(
        out,
        dataset="fake",
        source_layout="test",
        image_size=(SIZE, SIZE),
        features=["image", "seg", "depth", "normals", "edge"],
        num_classes={"seg": 40},
        splits={"val": entry},
    )
    return out


def test_npz_holds_the_stored_example_decoded_per_the_batch_contract(data_dir, tmp_path):
    out = str(tmp_path / "ex.npz")
    png = str(tmp_path / "ex.png")
    assert prep_inspect.main(["--data", data_dir, "--split", "val", "--index", "3", "--out", out, "--png", png]) == 0
    stored = build_example("3")
    with np.load(out, allow_pickle=False) as npz:
        got = dict(npz)
    assert str(got["id"]) == "ex3"
    np.testing.assert_allclose(got["image"], stored["image"] / 255.0, atol=1e-7)
    assert got["seg"].dtype == np.int32
    np.testing.assert_array_equal(got["seg"], stored["seg"])
    # the reference depth normalisation, written independently: /max, then clip to [0.1, p99 of the divided map]
    divided = stored["depth"].astype(np.float64) / stored["depth"].max()
    expected_depth = np.clip(divided, 0.1, np.percentile(divided, 99))
    np.testing.assert_allclose(got["depth"][..., 0], expected_depth, rtol=1e-6)
    np.testing.assert_array_equal(got["depth_valid"][..., 0], stored["depth"] > 0)
    np.testing.assert_allclose(got["depth_scale"], stored["depth"].max(), rtol=1e-6)
    np.testing.assert_array_equal(got["normals"], stored["normals"])
    np.testing.assert_array_equal(got["edge"][..., 0], stored["edge"])
    assert os.path.getsize(png) > 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_npz_equals_the_pipelines_own_batch(data_dir):
    from mtl_sparse_jax.data.pipeline import iterate_batches

    batches = list(
        iterate_batches(
            data_dir, "val", tasks=["seg", "depth"], batch_size=1, train=False, process_index=0, process_count=1
        )
    )
    example = prep_inspect.load_example(data_dir, "val", 4, tasks=["seg", "depth"])
    assert set(example) == {"id", "image", "seg", "depth", "depth_valid", "depth_scale"}
    for key in ("image", "seg", "depth", "depth_valid", "depth_scale"):
        np.testing.assert_array_equal(example[key], batches[4][key][0])


def test_out_of_range_index_is_one_line_error(data_dir, tmp_path, capsys):
    assert (
        prep_inspect.main(["--data", data_dir, "--split", "val", "--index", "5", "--out", str(tmp_path / "x.npz")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has 5 examples" in err and not os.path.exists(tmp_path / "x.npz")
