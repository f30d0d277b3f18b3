"""Synthetic demo data: geometry-consistent targets, class coverage, and the same pipeline as real data."""

import os

import numpy as np
import pytest

from data_prep import synthetic
from mtl_sparse_jax.data import pipeline as input_pipeline
from mtl_sparse_jax.data import spec as data_spec

SIZE = 48
NUM_TRAIN = 8


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Generated on disk and read back through the training pipeline, as the trainer sees it."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.generate(out, num_train=NUM_TRAIN, num_val=3, num_test=2, image_size=SIZE, seed=7, shard_size=3)
    manifest = data_spec.load_manifest(out, verify="sha256")
    (batch,) = input_pipeline.iterate_batches(
        out,
        "train",
        tasks=["seg", "depth", "normals", "edge"],
        batch_size=NUM_TRAIN,
        train=False,
        depth_norm="none",
        process_index=0,
        process_count=1,
    )
    return out, manifest, batch


def back_projected_points(depth, manifest):
    """Camera-frame 3-D points from z-depth, with the manifest's pinhole intrinsics."""
    focal = manifest["extra"]["focal_px"]
    cx, cy = manifest["extra"]["principal_point"]
    rows, cols = np.mgrid[0 : depth.shape[0], 0 : depth.shape[1]]
    rays = np.stack([(cols + 0.5 - cx) / focal, (rows + 0.5 - cy) / focal, np.ones(depth.shape)], axis=-1)
    return rays * depth[..., None]


def neighbourhood_all(mask):
    """True where the whole 3x3 neighbourhood is True (False on the border)."""
    out = np.zeros_like(mask)
    inner = np.ones_like(mask[1:-1, 1:-1])
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            inner &= mask[1 + di : mask.shape[0] - 1 + di, 1 + dj : mask.shape[1] - 1 + dj]
    out[1:-1, 1:-1] = inner
    return out


def test_manifest_describes_a_synthetic_dataset(generated):
    _, manifest, batch = generated
    assert manifest["dataset"] == "synthetic"
    assert {s: e["num_examples"] for s, e in manifest["splits"].items()} == {"train": NUM_TRAIN, "val": 3, "test": 2}
    assert set(manifest["features"]) == {"image", "seg", "depth", "normals", "edge"}
    assert manifest["image_size"] == [SIZE, SIZE] and manifest["num_classes"] == {"seg": 6}
    assert batch["image"].shape == (NUM_TRAIN, SIZE, SIZE, 3)


def test_normals_are_unit_face_the_camera_and_vanish_with_depth(generated):
    _, manifest, batch = generated
    depth, normals = batch["depth"][..., 0], batch["normals"]
    valid = depth > 0
    lengths = np.linalg.norm(normals, axis=-1)
    np.testing.assert_allclose(lengths[valid], 1.0, atol=1e-5)
    assert np.all(lengths[~valid] == 0)
    for d, n in zip(depth, normals):
        points = back_projected_points(d, manifest)
        assert np.all(np.einsum("ijk,ijk->ij", points, n)[d > 0] < 0)  # facing the camera


def test_normals_agree_with_finite_differences_of_the_depth(generated):
    _, manifest, batch = generated
    errors_deg = []
    for depth, normals, seg, edge in zip(batch["depth"][..., 0], batch["normals"], batch["seg"], batch["edge"][..., 0]):
        points = back_projected_points(depth, manifest)
        d_cols = np.zeros_like(points)
        d_rows = np.zeros_like(points)
        d_cols[:, 1:-1] = points[:, 2:] - points[:, :-2]
        d_rows[1:-1] = points[2:] - points[:-2]
        estimate = np.cross(d_cols, d_rows)
        estimate /= np.maximum(np.linalg.norm(estimate, axis=-1, keepdims=True), 1e-12)
        estimate *= -np.sign(np.einsum("ijk,ijk->ij", estimate, points))[..., None]
        # Smooth pixels: one class, valid depth, no edge, and no crease (box corners) in the 3x3 neighbourhood.
        smooth = neighbourhood_all((depth > 0) & (edge == 0))
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                shifted_seg = np.roll(seg, (di, dj), axis=(0, 1))
                shifted_n = np.roll(normals, (di, dj), axis=(0, 1))
                smooth &= (shifted_seg == seg) & (np.einsum("ijk,ijk->ij", shifted_n, normals) > 0.98)
        cosine = np.clip(np.einsum("ijk,ijk->ij", estimate, normals)[smooth], -1, 1)
        errors_deg.append(np.degrees(np.arccos(cosine)))
    errors_deg = np.concatenate(errors_deg)
    assert errors_deg.size > 0.3 * batch["depth"][..., 0].size
    assert np.median(errors_deg) < 0.5 and np.percentile(errors_deg, 99) < 3.0


def test_edges_are_label_and_depth_discontinuities(generated):
    _, _, batch = generated
    for seg, depth, edge in zip(batch["seg"], batch["depth"][..., 0], batch["edge"][..., 0]):
        label_change = np.zeros(seg.shape, bool)
        depth_jump = np.zeros(seg.shape, bool)
        label_change[:, :-1] |= seg[:, :-1] != seg[:, 1:]
        label_change[:, 1:] |= seg[:, :-1] != seg[:, 1:]
        label_change[:-1] |= seg[:-1] != seg[1:]
        label_change[1:] |= seg[:-1] != seg[1:]
        for a, b, where_a, where_b in (
            (depth[:, :-1], depth[:, 1:], np.s_[:, :-1], np.s_[:, 1:]),
            (depth[:-1], depth[1:], np.s_[:-1], np.s_[1:]),
        ):
            jump = np.abs(a - b) > synthetic.EDGE_REL_DEPTH_JUMP * np.minimum(a, b)
            depth_jump[where_a] |= jump
            depth_jump[where_b] |= jump
        assert set(np.unique(edge)) <= {0.0, 1.0}
        assert np.all(edge[label_change] == 1)  # every class boundary is an edge, holes or not
        # Where the pixel and its 4-neighbours have valid depth, edges are exactly the two rules.
        valid = depth > 0
        all_valid = valid.copy()
        all_valid[:, 1:] &= valid[:, :-1]
        all_valid[:, :-1] &= valid[:, 1:]
        all_valid[1:] &= valid[:-1]
        all_valid[:-1] &= valid[1:]
        np.testing.assert_array_equal(edge[all_valid] == 1, (label_change | depth_jump)[all_valid])
        assert depth_jump[all_valid].any()  # an occluding contour somewhere in every scene


def test_every_class_appears_and_labels_stay_in_range():
    for num_classes in (6, 4):
        seen = set()
        for index in range(40):
            example = synthetic.build_example(f"s3-train-{index:06d}", seed=3, image_size=24, num_classes=num_classes)
            labels = set(np.unique(example["seg"]).tolist())
            assert {0, 1} <= labels  # every room shows its floor and a wall
            seen |= labels
        assert seen == set(range(num_classes))


def test_examples_depend_only_on_seed_split_and_index():
    a = synthetic.build_example("s1-val-000004", seed=1, image_size=16, num_classes=6)
    b = synthetic.build_example("s1-val-000004", seed=1, image_size=16, num_classes=6)
    c = synthetic.build_example("s1-val-000005", seed=1, image_size=16, num_classes=6)
    for name in ("image", "seg", "depth", "normals", "edge"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["depth"], c["depth"])
    with pytest.raises(ValueError, match="another seed"):
        synthetic.build_example("s2-val-000004", seed=1, image_size=16, num_classes=6)


def test_generate_again_with_the_same_parameters_rewrites_nothing(generated):
    out, manifest, _ = generated
    shard = os.path.join(out, manifest["splits"]["train"]["shards"][0]["file"])
    before = os.stat(shard).st_mtime_ns, os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    synthetic.generate(out, num_train=NUM_TRAIN, num_val=3, num_test=2, image_size=SIZE, seed=7, shard_size=3)
    after = os.stat(shard).st_mtime_ns, os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    assert before == after


def test_command_line_writes_a_readable_dataset(tmp_path):
    out = str(tmp_path / "cli")
    assert (
        synthetic.main(
            [
                "--out",
                out,
                "--num-train",
                "2",
                "--num-val",
                "1",
                "--num-test",
                "1",
                "--size",
                "16",
                "--num-classes",
                "5",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    manifest = data_spec.load_manifest(out, verify="sha256")
    assert manifest["num_classes"] == {"seg": 5} and manifest["image_size"] == [16, 16]
    assert synthetic.main(["--out", out, "--num-classes", "9"]) == 2
