"""NYU-v2 converter: fake raw datasets in each exact layout, converted and read back value by value."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import nyu
from data_prep.shards import BadExampleError

SIZE = 16
H, W = 24, 32  # native size of the fakes: non-square so that a transposition cannot go unnoticed


# ------------------------------------------------------------------------------------------ independent references


def bilinear_loop(x, out_h, out_w):
    """PyTorch upsample_bilinear2d (align_corners=False), pixel by pixel."""
    in_h, in_w = x.shape[:2]
    out = np.zeros((out_h, out_w) + x.shape[2:], np.float64)
    for oy in range(out_h):
        sy = max((oy + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1 = min(y0 + 1, in_h - 1)
        ly = sy - y0
        for ox in range(out_w):
            sx = max((ox + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1 = min(x0 + 1, in_w - 1)
            lx = sx - x0
            out[oy, ox] = (1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1]) + ly * (
                (1 - lx) * x[y1, x0] + lx * x[y1, x1]
            )
    return out


def nearest_loop(x, out_h, out_w):
    in_h, in_w = x.shape[:2]
    return np.array(
        [
            [x[min(oy * in_h // out_h, in_h - 1), min(ox * in_w // out_w, in_w - 1)] for ox in range(out_w)]
            for oy in range(out_h)
        ]
    )


def read_shards(out_dir, split):
    """Decode a split's shards with TF's protobuf + PIL + numpy, independently of the input pipeline."""
    import tensorflow as tf

    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    examples = []
    for shard in manifest["splits"][split]["shards"]:
        for record in tf.data.TFRecordDataset(os.path.join(out_dir, shard["file"])):
            feats = tf.train.Example.FromString(record.numpy()).features.feature
            ex = {}
            for name, feat in feats.items():
                if name == "id":
                    ex[name] = feat.bytes_list.value[0].decode()
                elif name in ("image", "seg"):
                    ex[name] = np.asarray(Image.open(io.BytesIO(feat.bytes_list.value[0])))
                elif feat.int64_list.value:
                    ex[name] = int(feat.int64_list.value[0])
                else:
                    ex[name] = np.frombuffer(feat.bytes_list.value[0], "<f4")
            for name, channels in (("depth", 0), ("edge", 0), ("normals", 3)):
                if name in ex:
                    size = manifest["image_size"]
                    ex[name] = ex[name].reshape(size + ([channels] if channels else []))
            examples.append(ex)
    return manifest, examples


# ------------------------------------------------------------------------------------------------ fake NYUD_MT


def make_nyud_mt(root, ids_by_split, seed=0):
    """Raw NYUD_MT: RGB JPEGs (one grayscale), 8-bit label PNGs (one 16-bit), depth/normals/edge .npy."""
    rng = np.random.default_rng(seed)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    raw = {}
    all_ids = [i for ids in ids_by_split.values() for i in ids]
    for n, example_id in enumerate(all_ids):
        if n == 1:  # a grayscale JPEG
            Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8), "L").save(
                os.path.join(root, "images", f"{example_id}.jpg")
            )
        else:
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                os.path.join(root, "images", f"{example_id}.jpg")
            )
        labels = rng.integers(0, 41, (H, W))
        labels[0, :3] = [0, 1, 40]  # unlabelled and both ends of the class range always occur
        if n == 2:  # a 16-bit PNG with values <= 40 is accepted
            Image.fromarray(labels.astype(np.uint16)).save(os.path.join(root, "segmentation", f"{example_id}.png"))
            assert Image.open(os.path.join(root, "segmentation", f"{example_id}.png")).mode.startswith("I")
        else:
            Image.fromarray(labels.astype(np.uint8)).save(os.path.join(root, "segmentation", f"{example_id}.png"))
        depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
        depth[rng.uniform(size=(H, W)) < 0.1] = 0.0
        normals = rng.normal(size=(H, W, 3))
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        normals[depth == 0] = 0.0
        edge = (rng.uniform(size=(H, W)) < 0.2).astype(np.float32)
        np.save(os.path.join(root, "depth", f"{example_id}.npy"), depth)
        np.save(os.path.join(root, "normals", f"{example_id}.npy"), normals.astype(np.float32))
        np.save(os.path.join(root, "edge", f"{example_id}.npy"), edge)
        raw[example_id] = {"labels": labels, "depth": depth, "normals": normals.astype(np.float32), "edge": edge}
    for split, ids in ids_by_split.items():
        with open(os.path.join(root, "gt_sets", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return raw


@pytest.fixture(scope="module")
def nyud_mt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nyud_mt"))
    splits = {"train": ["train_0", "train_1", "train_2", "train_3", "train_4"], "test": ["test_0", "test_1"]}
    raw = make_nyud_mt(root, splits)
    out = str(tmp_path_factory.mktemp("nyud_mt_out"))
    nyu.convert(root, out, size=SIZE, shard_size=2, workers=0, log=lambda *_: None)
    return root, splits, raw, out


def test_nyud_mt_values_match_layout_semantics(nyud_mt):
    root, splits, raw, out = nyud_mt
    for split, ids in splits.items():
        manifest, examples = read_shards(out, split)
        assert [ex["id"] for ex in examples] == ids  # split file order is kept
        for ex in examples:
            r = raw[ex["id"]]
            # seg: legacy nearest on the raw ids, then 0 -> 255 (ignore) and k -> k-1
            picked = nearest_loop(r["labels"], SIZE, SIZE)
            expected_seg = np.where(picked == 0, 255, picked - 1)
            np.testing.assert_array_equal(ex["seg"], expected_seg)
            assert ex["seg"].dtype == np.uint8 and set(np.unique(ex["seg"])) <= set(range(40)) | {255}
            np.testing.assert_allclose(ex["depth"], bilinear_loop(r["depth"], SIZE, SIZE), atol=1e-5)
            np.testing.assert_allclose(ex["normals"], bilinear_loop(r["normals"], SIZE, SIZE), atol=1e-6)
            np.testing.assert_allclose(ex["edge"], bilinear_loop(r["edge"], SIZE, SIZE), atol=1e-6)
            decoded = np.asarray(Image.open(os.path.join(root, "images", f"{ex['id']}.jpg")).convert("RGB"))
            expected_image = bilinear_loop(decoded.astype(np.float64), SIZE, SIZE)
            assert np.max(np.abs(ex["image"].astype(float) - expected_image)) <= 0.5 + 1e-6
    assert manifest["dataset"] == "nyuv2" and manifest["source_layout"] == "nyud_mt"
    assert manifest["num_classes"] == {"seg": 40}
    assert sorted(manifest["splits"]) == ["test", "train"]


def test_grayscale_jpeg_becomes_rgb(nyud_mt):
    _, _, _, out = nyud_mt
    _, examples = read_shards(out, "train")
    gray = examples[1]["image"]  # train_1 was written as a grayscale JPEG
    assert gray.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_label_mapping_is_reference_rule():
    labels = np.array([[0, 1, 2], [39, 40, 0]])
    np.testing.assert_array_equal(nyu.map_nyu40_labels(labels), [[255, 0, 1], [38, 39, 255]])
    with pytest.raises(BadExampleError, match="outside 0..40"):
        nyu.map_nyu40_labels(np.array([[41]]))


# ----------------------------------------------------------------------------------------------------- bad input


def _break(root, example_id, what):
    """Damage one file of a NYUD_MT fake and return the path that the error must name."""
    if what == "missing":
        path = os.path.join(root, "depth", f"{example_id}.npy")
        os.remove(path)
    elif what == "corrupt_image":
        path = os.path.join(root, "images", f"{example_id}.jpg")
        with open(path, "r+b") as f:
            data = f.read()
            f.seek(0)
            f.write(b"\x00" * 64)  # destroy the JPEG header
            f.truncate(len(data) // 3)
    elif what == "size":
        path = os.path.join(root, "edge", f"{example_id}.npy")
        np.save(path, np.zeros((H, W + 1), np.float32))
    elif what == "nan":
        path = os.path.join(root, "depth", f"{example_id}.npy")
        d = np.ones((H, W), np.float32)
        d[3, 4] = np.nan
        np.save(path, d)
    elif what == "inf":
        path = os.path.join(root, "depth", f"{example_id}.npy")
        d = np.ones((H, W), np.float32)
        d[0, 0] = np.inf
        np.save(path, d)
    elif what == "label_range":
        path = os.path.join(root, "segmentation", f"{example_id}.png")
        Image.fromarray(np.full((H, W), 41, np.uint8)).save(path)
    elif what == "label16_range":
        path = os.path.join(root, "segmentation", f"{example_id}.png")
        Image.fromarray(np.full((H, W), 300, np.uint16)).save(path)
    elif what == "pickled":
        path = os.path.join(root, "normals", f"{example_id}.npy")
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        raise AssertionError(what)
    return path


@pytest.mark.parametrize(
    "what,message",
    [
        ("missing", "missing depth"),
        ("corrupt_image", "cannot decode image"),
        ("size", "do not belong together"),
        ("nan", "NaN/inf"),
        ("inf", "NaN/inf"),
        ("label_range", "outside 0..40"),
        ("label16_range", "outside 0..40"),
        ("pickled", "pickled"),
    ],
)
def test_bad_input_names_the_file(tmp_path, what, message):
    root = str(tmp_path)
    make_nyud_mt(root, {"train": ["a"]})
    path = _break(root, "a", what)
    with pytest.raises(BadExampleError, match=message) as info:
        nyu.nyud_mt_example("a", src=root, size=SIZE)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_cli_stops_with_one_line_or_skips_and_reports(tmp_path, capsys):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_nyud_mt(root, {"train": ["a", "b", "c"]})
    path = _break(root, "b", "nan")
    assert nyu.main(["--src", root, "--out", out, "--size", str(SIZE), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and err[0].startswith("error:")
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    assert nyu.main(["--src", root, "--out", out, "--size", str(SIZE), "--workers", "0", "--skip-bad"]) == 0
    assert path in capsys.readouterr().out  # the skipped example is reported
    manifest, examples = read_shards(out, "train")
    assert [ex["id"] for ex in examples] == ["a", "c"]
    assert [s["key"] for s in manifest["splits"]["train"]["skipped"]] == ["b"]


def test_killed_conversion_resumes_to_identical_shards(tmp_path):
    """A conversion that dies on the 5th key (shards 0-1 written), rerun after the fix, equals a clean run."""
    ids = {"train": [f"t{i}" for i in range(7)]}
    root, out, clean_out = str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "clean")
    make_nyud_mt(root, ids)
    good = os.path.join(root, "depth", "t4.npy")
    saved = np.load(good)
    _break(root, "t4", "missing")
    with pytest.raises(BadExampleError, match="t4.npy"):
        nyu.convert(root, out, size=SIZE, shard_size=2, workers=0, log=lambda *_: None)
    staging = os.path.join(out, ".staging")  # finished shards wait there until the manifest is written
    first = sorted(f for f in os.listdir(staging) if f.endswith(".tfrecord"))
    assert first == ["train-00000-of-00004.tfrecord", "train-00001-of-00004.tfrecord"]
    mtimes = {f: os.stat(os.path.join(staging, f)).st_mtime_ns for f in first}
    np.save(good, saved)
    nyu.convert(root, out, size=SIZE, shard_size=2, workers=0, log=lambda *_: None)
    nyu.convert(root, clean_out, size=SIZE, shard_size=2, workers=0, log=lambda *_: None)
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in first} == mtimes  # finished shards were kept
    with open(os.path.join(out, "manifest.json")) as f:
        resumed = json.load(f)["splits"]
    with open(os.path.join(clean_out, "manifest.json")) as f:
        clean = json.load(f)["splits"]
    assert resumed == clean  # same files, counts and sha256 checksums


def test_val_from_train_and_missing_val_handling():
    splits = {"train": list(range(10)), "val": [100, 101]}
    carved = nyu.carve_val_from_train(splits, 0.3, seed=0)
    assert carved["test"] == [100, 101]  # a lone source val is the standard test set
    assert len(carved["val"]) == 3 and sorted(carved["val"] + carved["train"]) == list(range(10))
    assert carved["train"] == sorted(carved["train"])  # train keeps its order
    assert nyu.carve_val_from_train(splits, 0.0, seed=0) == splits
    with pytest.raises(ValueError, match="already has val and test"):
        nyu.carve_val_from_train({"train": [1, 2], "val": [3], "test": [4]}, 0.5, seed=0)


# ---------------------------------------------------------------------------------------------- labeled .mat


def make_labeled_mat(root, num_images=4, seed=0):
    """A tiny nyu_depth_v2_labeled.mat in MATLAB v7.3's layout: MATLAB's column-major H×W×3×N array appears
    through HDF5 with reversed axes, (N, 3, W, H); depths/labels H×W×N appear as (N, W, H)."""
    import h5py
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, H, W, 3), dtype=np.uint8)  # natural [n, h, w, c]
    depths = rng.uniform(0.7, 8.0, (num_images, H, W)).astype(np.float32)
    labels = rng.integers(0, 895, (num_images, H, W)).astype(np.uint16)
    labels[:, 0, :3] = [0, 1, 894]
    with h5py.File(os.path.join(root, "nyu_depth_v2_labeled.mat"), "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    mapping = rng.integers(0, 41, 894)  # class k (1..894) -> mapping[k-1] in 0..40
    savemat(os.path.join(root, "classMapping40.mat"), {"mapClass": mapping[None, :].astype(np.float64)})
    # 1-based column vectors, like the standard splits.mat
    savemat(
        os.path.join(root, "splits.mat"),
        {"trainNdxs": np.array([[1], [3], [4]], np.float64), "testNdxs": np.array([[2]], np.float64)},
    )
    return images, depths, labels, mapping


def test_labeled_mat_is_untransposed_and_mapped(tmp_path):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    os.makedirs(root)
    images, depths, labels, mapping = make_labeled_mat(root)
    assert nyu.detect_layout(root) == "mat"
    nyu.convert(root, out, size=SIZE, workers=0, log=lambda *_: None)
    for split, indices in (("train", [1, 3, 4]), ("test", [2])):
        manifest, examples = read_shards(out, split)
        assert [ex["id"] for ex in examples] == [f"{i:04d}" for i in indices]
        for ex, index in zip(examples, indices):
            n = index - 1
            label40 = np.where(labels[n] == 0, 0, mapping[np.maximum(labels[n].astype(int), 1) - 1])
            expected_seg = nearest_loop(np.where(label40 == 0, 255, label40 - 1), SIZE, SIZE)
            np.testing.assert_array_equal(ex["seg"], expected_seg)
            np.testing.assert_allclose(ex["depth"], bilinear_loop(depths[n], SIZE, SIZE), atol=1e-5)
            expected_image = bilinear_loop(images[n].astype(np.float64), SIZE, SIZE)
            assert np.max(np.abs(ex["image"].astype(float) - expected_image)) <= 0.5 + 1e-6
            assert ex["normals"].shape == (SIZE, SIZE, 3)
    assert manifest["source_layout"] == "mat" and "edge" not in manifest["features"]


def test_class_mapping_and_split_file_formats(tmp_path):
    table = np.arange(894) % 41
    for name, writer in (
        ("m.npy", lambda p: np.save(p, table)),
        ("m.txt", lambda p: open(p, "w").write("  ".join(map(str, table)) + "\n")),
        ("m.json", lambda p: open(p, "w").write(json.dumps(table.tolist()))),
    ):
        path = str(tmp_path / name)
        writer(path)
        lookup = nyu.load_class_mapping(path)
        assert lookup[0] == 0 and lookup.size == 895
        np.testing.assert_array_equal(lookup[1:], table)
    np.save(tmp_path / "bad.npy", np.full(894, 41))
    with pytest.raises(ValueError, match="outside 0..40"):
        nyu.load_class_mapping(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "short.npy", np.zeros(40, int))
    with pytest.raises(ValueError, match="40 entries"):
        nyu.load_class_mapping(str(tmp_path / "short.npy"))
    (tmp_path / "s.json").write_text(json.dumps({"trainNdxs": [1, 2], "testNdxs": [3]}))
    assert nyu.load_mat_splits(str(tmp_path / "s.json")) == {"train": [1, 2], "test": [3]}
    (tmp_path / "o.json").write_text(json.dumps({"trainNdxs": [1, 2], "testNdxs": [2]}))
    with pytest.raises(ValueError, match="more than one split"):
        nyu.load_mat_splits(str(tmp_path / "o.json"))


def test_normals_from_depth_recover_a_plane():
    """Depth of the plane n·P = d seen through a pinhole camera gives back ±n (facing the camera) inside."""
    fx, fy, cx, cy = 50.0, 55.0, 15.5, 11.0
    normal = np.array([0.3, -0.4, -1.0])
    normal /= np.linalg.norm(normal)
    d = -2.0  # n·P = d < 0: the normal points back towards the camera at the origin
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)
    depth = d / (rays @ normal)
    assert np.all(depth > 0)
    depth[5, 7] = 0.0  # one invalid pixel
    got = nyu.normals_from_depth(depth, fx, fy, cx, cy)
    invalid = np.zeros((H, W), bool)
    invalid[[0, -1], :] = invalid[:, [0, -1]] = True
    invalid[5, 6:9] = invalid[4:7, 7] = True  # the pixel and its 4 neighbours
    np.testing.assert_array_equal(got[invalid], 0.0)
    np.testing.assert_allclose(got[~invalid], np.broadcast_to(normal, got[~invalid].shape), atol=1e-5)


# ---------------------------------------------------------------------------------------------- MTAN / LibMTL


def test_mtan_layout(tmp_path):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    rng = np.random.default_rng(3)
    raw = {}
    for folder, count in (("train", 2), ("val", 1)):
        for sub in ("image", "label", "depth", "normal"):
            os.makedirs(os.path.join(root, folder, sub))
        for i in range(count):
            image = rng.uniform(0, 1, (H, W, 3))
            label = rng.integers(-1, 13, (H, W)).astype(np.float32)
            depth = rng.uniform(0, 5, (H, W, 1)).astype(np.float32)
            normal = rng.uniform(-1, 1, (H, W, 3)).astype(np.float32)
            for sub, arr in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                np.save(os.path.join(root, folder, sub, f"{i}.npy"), arr)
            raw[f"{folder}_{i}"] = (image, label, depth)
    assert nyu.detect_layout(root) == "mtan"
    nyu.convert(root, out, size=SIZE, workers=0, log=lambda *_: None)
    manifest, examples = read_shards(out, "test")  # the MTAN 'val' folder is the standard test set
    assert manifest["num_classes"] == {"seg": 13} and [ex["id"] for ex in examples] == ["val_0"]
    for split in ("train", "test"):
        for ex in read_shards(out, split)[1]:
            image, label, depth = raw[ex["id"]]
            picked = nearest_loop(label, SIZE, SIZE)
            np.testing.assert_array_equal(ex["seg"], np.where(picked < 0, 255, picked))
            np.testing.assert_allclose(ex["depth"], bilinear_loop(depth[..., 0], SIZE, SIZE), atol=1e-5)
            expected = bilinear_loop(np.round(image * 255), SIZE, SIZE)
            assert np.max(np.abs(ex["image"] - expected)) <= 0.5 + 1e-6


def test_detect_layout_refuses_unknown_folder(tmp_path):
    with pytest.raises(ValueError, match="--layout"):
        nyu.detect_layout(str(tmp_path))
