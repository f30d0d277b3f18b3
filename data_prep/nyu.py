"""Convert NYU-v2 into TFRecord shards, from any of the three layouts people actually hold.

    python -m data_prep.nyu --src DIR --out DIR [--layout nyud_mt|mat|mtan] [--size 256] [--shard-size N]
                            [--workers N] [--skip-bad] [--tasks seg,depth,normals,edge] [--val-from-train F]

Layouts:
  nyud_mt  the ASTMT / MTI-Net "NYUD_MT" export the authors' loader reads: images/<id>.jpg, segmentation/<id>.png
           (0 = unlabelled, 1..40 = classes), depth/<id>.npy (metres), normals/<id>.npy (H×W×3, invalid = 0),
           edge/<id>.npy, gt_sets/{train,val,test}.txt. Labels map exactly as the reference: 0 → 255, k → k−1.
  mat      the official nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5) + a 894 → 40 class mapping + a split file
           (standard 795 train / 654 test). Normals are computed from depth (`normals_from_depth`); no edges.
  mtan     the preprocessed .npy layout of MTAN / LibMTL: {train,val}/{image,label,depth,normal}/<i>.npy,
           13 classes with −1 = ignore. Its `val` folder is the standard 654-image test set and becomes `test`.

Every example is resized here to --size × --size with PyTorch semantics (see `data_prep.resize`), so shards are
small and the input pipeline never resizes. Depth stays in metres with 0 = invalid.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys

import numpy as np

from data_prep import raw_io
from data_prep.raw_io import BadExampleError
from data_prep.resize import resize_bilinear, resize_image_uint8, resize_nearest
from mtl_sparse_jax import cli

LAYOUTS = ("nyud_mt", "mat", "mtan")
SPLITS = ("train", "val", "test")
IGNORE_LABEL = 255
NYU40_NUM_CLASSES = 40
NYU894_NUM_CLASSES = 894
MTAN_NUM_CLASSES = 13
ALL_TASKS = ("seg", "depth", "normals", "edge")
LAYOUT_TASKS = {"nyud_mt": ALL_TASKS, "mat": ("seg", "depth", "normals"), "mtan": ("seg", "depth", "normals")}
LAYOUT_NUM_CLASSES = {"nyud_mt": NYU40_NUM_CLASSES, "mat": NYU40_NUM_CLASSES, "mtan": MTAN_NUM_CLASSES}

# Colour-camera intrinsics of the NYU-v2 Kinect (the toolbox's camera_params.m), valid for the 640×480 frames.
NYU_KINECT_INTRINSICS = {"fx": 518.857901, "fy": 519.469611, "cx": 325.582449, "cy": 253.736166}

MAT_FILE_NAME = "nyu_depth_v2_labeled.mat"
MAPPING_FILE_NAMES = (
    "classMapping40.mat",
    "class_mapping_40.npy",
    "class_mapping_40.txt",
    "class_mapping_40.json",
    "mapping40.npy",
    "mapping40.txt",
    "mapping40.json",
)
SPLIT_FILE_NAMES = ("splits.mat", "splits.json")


# --------------------------------------------------------------------------------------------------- common parts


def map_nyu40_labels(labels: np.ndarray, path: str = "<labels>") -> np.ndarray:
    """NYUD_MT label ids (0 = unlabelled, 1..40) → stored labels (255 = ignore, 0..39), as the reference does."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > NYU40_NUM_CLASSES):
        raise BadExampleError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside 0..40")
    out = labels.astype(np.int64) - 1
    out[labels == 0] = IGNORE_LABEL
    return out.astype(np.uint8)


def resize_example(example: dict, size: int) -> dict:
    """Resize every array of an example to size × size: bilinear (no antialias) for image/depth/normals/edge,
    legacy nearest for seg. Non-array entries pass through."""
    out = dict(example)
    for name, value in example.items():
        if name == "image":
            out[name] = resize_image_uint8(value, size, size)
        elif name == "seg":
            out[name] = resize_nearest(value, size, size).astype(np.uint8)
        elif name in ("depth", "normals", "edge"):
            out[name] = resize_bilinear(value, size, size).astype(np.float32)
    return out


def _check_depth(depth: np.ndarray, path: str) -> np.ndarray:
    raw_io.require_finite(depth, path, "depth")
    if depth.size and depth.min() < 0:
        raise BadExampleError(
            f"{path}: depth has negative values (min {depth.min():.3g}); expected metres with 0 = invalid"
        )
    return depth.astype(np.float32)


def normals_from_depth(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Unit surface normals [H, W, 3] from a metric depth map by back-projection and central differences.

    Each pixel (u, v) with depth z is back-projected to P = ((u−cx)·z/fx, (v−cy)·z/fy, z) in the camera frame
    (x right, y down, z forward). With tangents T_u = P(u+1,v) − P(u−1,v) and T_v = P(u,v+1) − P(u,v−1), the
    normal is T_v × T_u normalised, which faces the camera (n·P < 0). Pixels on the image border, or whose depth
    or any of the four neighbours' depth is invalid (≤ 0 or not finite), get (0, 0, 0), the stored "invalid"
    value.
    """
    depth = np.asarray(depth, dtype=np.float64)
    height, width = depth.shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    z = np.where(valid, depth, 0.0)
    points = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1)
    t_u = np.zeros_like(points)
    t_v = np.zeros_like(points)
    t_u[:, 1:-1] = points[:, 2:] - points[:, :-2]
    t_v[1:-1, :] = points[2:, :] - points[:-2, :]
    normals = np.cross(t_v, t_u)
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    ok = valid.copy()
    ok[:, 1:-1] &= valid[:, 2:] & valid[:, :-2]
    ok[1:-1, :] &= valid[2:, :] & valid[:-2, :]
    ok[0, :] = ok[-1, :] = False
    ok[:, 0] = ok[:, -1] = False
    ok &= norm[..., 0] > 0
    normals = np.where(ok[..., None], normals / np.where(norm > 0, norm, 1.0), 0.0)
    return normals.astype(np.float32)


# ------------------------------------------------------------------------------------------------------ nyud_mt


def read_split_list(path: str) -> list[str]:
    with open(path) as f:
        ids = [line.strip() for line in f.read().splitlines() if line.strip()]
    seen = set()
    for example_id in ids:
        if example_id in seen:
            raise ValueError(f"{path}: id {example_id!r} appears twice; remove the duplicate line")
        seen.add(example_id)
    return ids


def read_nyud_mt_splits(src: str) -> dict[str, list[str]]:
    """Split name → ids from gt_sets/{train,val,test}.txt; only the files present are returned."""
    splits = {}
    for split in SPLITS:
        path = os.path.join(src, "gt_sets", f"{split}.txt")
        if os.path.isfile(path):
            splits[split] = read_split_list(path)
    if "train" not in splits:
        raise ValueError(
            f"{os.path.join(src, 'gt_sets', 'train.txt')}: missing; the NYUD_MT layout needs "
            "gt_sets/train.txt (one id per line)"
        )
    return splits


def nyud_mt_example(example_id: str, *, src: str, size: int, tasks=ALL_TASKS) -> dict:
    """Read, validate, map and resize one NYUD_MT example."""
    image_path = os.path.join(src, "images", f"{example_id}.jpg")
    image = raw_io.read_rgb(image_path)
    hw = image.shape[:2]
    example = {"id": example_id, "image": image}
    if "seg" in tasks:
        path = os.path.join(src, "segmentation", f"{example_id}.png")
        labels = raw_io.read_label_image(path, NYU40_NUM_CLASSES, "segmentation")
        raw_io.require_hw(labels, hw, path, "segmentation")
        example["seg"] = map_nyu40_labels(labels, path)
    if "depth" in tasks:
        path = os.path.join(src, "depth", f"{example_id}.npy")
        depth = raw_io.require_hw(raw_io.read_npy(path, "depth"), hw, path, "depth")
        example["depth"] = _check_depth(depth, path)
    if "normals" in tasks:
        path = os.path.join(src, "normals", f"{example_id}.npy")
        normals = raw_io.require_hw(raw_io.read_npy(path, "normals"), hw, path, "normals", channels=3)
        raw_io.require_finite(normals, path, "normals")
        example["normals"] = normals.astype(np.float32)
    if "edge" in tasks:
        path = os.path.join(src, "edge", f"{example_id}.npy")
        edge = raw_io.require_hw(raw_io.read_npy(path, "edge"), hw, path, "edge")
        raw_io.require_finite(edge, path, "edge")
        example["edge"] = edge.astype(np.float32)
    return resize_example(example, size)


def nyud_mt_files(example_id: str, *, src: str, tasks=ALL_TASKS) -> list[str]:
    """The files `nyud_mt_example` reads for `example_id` (for the shard writer's source fingerprint)."""
    paths = [os.path.join(src, "images", f"{example_id}.jpg")]
    for task, folder, ext in (
        ("seg", "segmentation", "png"),
        ("depth", "depth", "npy"),
        ("normals", "normals", "npy"),
        ("edge", "edge", "npy"),
    ):
        if task in tasks:
            paths.append(os.path.join(src, folder, f"{example_id}.{ext}"))
    return paths


# --------------------------------------------------------------------------------------------------------- mtan


def read_mtan_splits(src: str) -> dict[str, list[str]]:
    """Keys '<folder>/<i>' for {train,val}/image/<i>.npy; the MTAN `val` folder is the standard test set."""
    splits = {}
    for folder, split in (("train", "train"), ("val", "test")):
        names = glob.glob(os.path.join(src, folder, "image", "*.npy"))
        indices = []
        for name in names:
            stem = os.path.splitext(os.path.basename(name))[0]
            if not stem.isdigit():
                raise ValueError(f"{name}: unexpected file name; the MTAN layout names files <index>.npy")
            indices.append(int(stem))
        if indices:
            splits[split] = [f"{folder}/{i}" for i in sorted(indices)]
    if "train" not in splits:
        raise ValueError(f"{os.path.join(src, 'train', 'image')}: no <i>.npy files; not an MTAN/LibMTL NYU-v2 folder")
    return splits


def mtan_example(key: str, *, src: str, size: int, tasks=LAYOUT_TASKS["mtan"]) -> dict:
    """One MTAN/LibMTL example: image float [0,1] H×W×3, label float (−1 = ignore, 0..12), depth H×W×1 in metres,
    normal H×W×3."""
    folder, index = key.split("/")
    base = os.path.join(src, folder)
    image_path = os.path.join(base, "image", f"{index}.npy")
    image = raw_io.read_npy(image_path, "image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadExampleError(f"{image_path}: image has shape {image.shape}; expected [H, W, 3]")
    if image.dtype != np.uint8:
        raw_io.require_finite(image, image_path, "image")
        if image.min() < 0 or image.max() > 1.0 + 1e-6:
            raise BadExampleError(
                f"{image_path}: float image spans [{image.min():.3g}, {image.max():.3g}]; expected [0, 1]"
            )
        image = np.clip(np.rint(image.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    hw = image.shape[:2]
    example = {"id": f"{folder}_{index}", "image": image}
    if "seg" in tasks:
        path = os.path.join(base, "label", f"{index}.npy")
        labels = raw_io.require_hw(raw_io.read_npy(path, "label"), hw, path, "label")
        raw_io.require_finite(labels, path, "label")
        if np.any(labels != np.round(labels)):
            raise BadExampleError(f"{path}: label values are not integers; expected −1 (ignore) or 0..12")
        if labels.size and (labels.min() < -1 or labels.max() > MTAN_NUM_CLASSES - 1):
            raise BadExampleError(f"{path}: labels span [{labels.min():g}, {labels.max():g}], outside −1..12")
        labels = labels.astype(np.int64)
        example["seg"] = np.where(labels < 0, IGNORE_LABEL, labels).astype(np.uint8)
    if "depth" in tasks:
        path = os.path.join(base, "depth", f"{index}.npy")
        depth = raw_io.require_hw(raw_io.read_npy(path, "depth"), hw, path, "depth")
        example["depth"] = _check_depth(depth, path)
    if "normals" in tasks:
        path = os.path.join(base, "normal", f"{index}.npy")
        normals = raw_io.require_hw(raw_io.read_npy(path, "normal"), hw, path, "normal", channels=3)
        raw_io.require_finite(normals, path, "normal")
        example["normals"] = normals.astype(np.float32)
    return resize_example(example, size)


def mtan_files(key: str, *, src: str, tasks=LAYOUT_TASKS["mtan"]) -> list[str]:
    """The files `mtan_example` reads for `key` (for the shard writer's source fingerprint)."""
    folder, index = key.split("/")
    paths = [os.path.join(src, folder, "image", f"{index}.npy")]
    for task, name in (("seg", "label"), ("depth", "depth"), ("normals", "normal")):
        if task in tasks:
            paths.append(os.path.join(src, folder, name, f"{index}.npy"))
    return paths


# ---------------------------------------------------------------------------------------------------------- mat


def _load_mat_variables(path: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read numeric variables from a MATLAB file, v7.3 (HDF5, via h5py) or older (via scipy.io.loadmat)."""
    import h5py

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            return {name: np.asarray(f[name]) for name in names if name in f}
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"{path}: a pre-v7.3 MATLAB file needs scipy to read; pip install scipy") from None
    try:
        data = loadmat(path)
    except Exception as err:
        raise ValueError(f"{path}: cannot read MATLAB file ({err})") from None
    return {name: np.asarray(data[name]) for name in names if name in data}


def load_class_mapping(path: str) -> np.ndarray:
    """The 894 → 40 class mapping as a lookup table `table[label894] = label40` of length 895 (table[0] = 0).

    Accepted: classMapping40.mat (variable `mapClass`, 894 entries for classes 1..894), or a .npy / .txt
    (whitespace-separated) / .json list of 894 ints (entry k−1 is the 40-class id of class k) or of 895 ints
    (entry k for class k, entry 0 must be 0). Values must lie in 0..40 (0 = unlabelled).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: class mapping file not found; pass --mapping FILE (e.g. classMapping40.mat)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mat":
        variables = _load_mat_variables(path, ("mapClass",))
        if "mapClass" not in variables:
            raise ValueError(f"{path}: no variable 'mapClass'; expected Gupta et al.'s classMapping40.mat")
        values = variables["mapClass"]
    elif ext == ".npy":
        values = np.load(path, allow_pickle=False)
    elif ext == ".txt":
        with open(path) as f:
            values = np.array(f.read().split(), dtype=np.float64)
    elif ext == ".json":
        with open(path) as f:
            values = np.asarray(json.load(f))
    else:
        raise ValueError(f"{path}: unknown mapping format {ext!r}; use .mat (mapClass), .npy, .txt or .json")
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind not in "biuf" or np.any(values != np.round(values)):
        raise ValueError(f"{path}: the mapping must hold integers 0..40")
    values = values.astype(np.int64)
    if values.size == NYU894_NUM_CLASSES:
        values = np.concatenate([[0], values])
    elif values.size == NYU894_NUM_CLASSES + 1:
        if values[0] != 0:
            raise ValueError(f"{path}: a 895-entry mapping must map class 0 (unlabelled) to 0, found {values[0]}")
    else:
        raise ValueError(f"{path}: the mapping has {values.size} entries; expected 894 (classes 1..894) or 895")
    if values.min() < 0 or values.max() > NYU40_NUM_CLASSES:
        raise ValueError(f"{path}: mapped classes span [{values.min()}, {values.max()}], outside 0..40")
    return values


def load_mat_splits(path: str) -> dict[str, list[int]]:
    """Split name → 1-based image indices. Accepted: splits.mat with trainNdxs/testNdxs (and optional valNdxs),
    or a .json object with the same keys and 1-based integer lists."""
    keys = {"trainNdxs": "train", "valNdxs": "val", "testNdxs": "test"}
    if not os.path.isfile(path):
        raise ValueError(f"{path}: split file not found; pass --split-file FILE (e.g. splits.mat)")
    if path.lower().endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        variables = {k: np.asarray(v) for k, v in data.items() if k in keys}
    else:
        variables = _load_mat_variables(path, tuple(keys))
    if "trainNdxs" not in variables:
        raise ValueError(f"{path}: no 'trainNdxs'; expected trainNdxs/testNdxs with 1-based indices")
    splits = {}
    for key, split in keys.items():
        if key in variables:
            indices = np.asarray(variables[key]).reshape(-1)
            if indices.dtype.kind not in "biuf" or np.any(indices != np.round(indices)) or np.any(indices < 1):
                raise ValueError(f"{path}: {key} must hold 1-based positive integer indices")
            splits[split] = [int(i) for i in indices]
    all_indices = [i for ids in splits.values() for i in ids]
    if len(set(all_indices)) != len(all_indices):
        raise ValueError(f"{path}: an index appears in more than one split (or twice in one)")
    return splits


_OPEN_MAT_FILES: dict = {}


def _mat_file(path: str):
    # Opened lazily once per worker process: h5py handles cannot be pickled into workers.
    handle = _OPEN_MAT_FILES.get(path)
    if handle is None:
        import h5py

        handle = h5py.File(path, "r")
        _OPEN_MAT_FILES[path] = handle
    return handle


def check_mat_file(path: str) -> int:
    """Validate the labeled .mat's structure; return the number of images."""
    import h5py

    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found; download nyu_depth_v2_labeled.mat or pass --mat FILE")
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"{path}: not a MATLAB v7.3 (HDF5) file; the official nyu_depth_v2_labeled.mat is v7.3 — "
            "re-download it (a truncated download also ends up here)"
        )
    with h5py.File(path, "r") as f:
        for name in ("images", "depths", "labels"):
            if name not in f:
                raise ValueError(f"{path}: no dataset {name!r}; expected nyu_depth_v2_labeled.mat")
        n, channels, width, height = f["images"].shape
        if channels != 3:
            raise ValueError(f"{path}: images has shape {f['images'].shape}; expected MATLAB's transposed (N,3,W,H)")
        for name in ("depths", "labels"):
            if f[name].shape != (n, width, height):
                raise ValueError(f"{path}: {name} has shape {f[name].shape}; expected {(n, width, height)}")
    return int(n)


def mat_example(key: str, *, mat_path: str, mapping: np.ndarray, size: int, tasks=LAYOUT_TASKS["mat"]) -> dict:
    """One example of nyu_depth_v2_labeled.mat by 1-based index.

    MATLAB stores column-major, so through HDF5 the arrays appear transposed: images (N,3,W,H), depths and labels
    (N,W,H). Image i is images[i−1].transpose(2,1,0) → [H,W,3]; depth and labels are [i−1].T → [H,W].
    """
    index = int(key)
    where = f"{mat_path}[image {index}]"
    f = _mat_file(mat_path)
    n = f["images"].shape[0]
    if not 1 <= index <= n:
        raise BadExampleError(f"{where}: index out of range 1..{n}; check the split file")
    image = np.asarray(f["images"][index - 1]).transpose(2, 1, 0)
    if image.dtype != np.uint8:
        raise BadExampleError(f"{where}: images has dtype {image.dtype}; expected uint8")
    example = {"id": f"{index:04d}", "image": np.ascontiguousarray(image)}
    depth = None
    if "depth" in tasks or "normals" in tasks:
        depth = np.asarray(f["depths"][index - 1], dtype=np.float32).T
        depth = _check_depth(depth, where)
    if "seg" in tasks:
        labels = np.asarray(f["labels"][index - 1]).T.astype(np.int64)
        if labels.min() < 0 or labels.max() >= mapping.size:
            raise BadExampleError(
                f"{where}: labels span [{labels.min()}, {labels.max()}], outside "
                f"0..{mapping.size - 1} of the class mapping"
            )
        example["seg"] = map_nyu40_labels(mapping[labels], where)
    if "depth" in tasks:
        example["depth"] = depth
    if "normals" in tasks:
        example["normals"] = normals_from_depth(depth, **NYU_KINECT_INTRINSICS)
    return resize_example(example, size)


def mat_files(key: str, *, mat_path: str, mapping_path: str | None) -> list[str]:
    """The files `mat_example` reads (the .mat and the class mapping), for the source fingerprint."""
    return [mat_path] + ([mapping_path] if mapping_path else [])


def _find_first(src: str, names) -> str | None:
    for name in names:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            return path
    return None


# -------------------------------------------------------------------------------------------------------- driver


def detect_layout(src: str) -> str:
    """Guess the layout from the folder's contents; fail with what was looked for."""
    if os.path.isdir(os.path.join(src, "images")) and os.path.isdir(os.path.join(src, "gt_sets")):
        return "nyud_mt"
    if os.path.isfile(os.path.join(src, MAT_FILE_NAME)):
        return "mat"
    if os.path.isdir(os.path.join(src, "train", "image")):
        return "mtan"
    raise ValueError(
        f"{src}: cannot tell the NYU-v2 layout: expected images/ + gt_sets/ (nyud_mt), {MAT_FILE_NAME} "
        "(mat) or train/image/*.npy (mtan); pass --layout"
    )


def carve_val_from_train(splits: dict, fraction: float, seed: int) -> dict:
    """Move a seeded random `fraction` of train into a new `val` split (train keeps its order).

    A source `val` without `test` (the standard NYUD_MT train/val = 795/654) is the standard test set, so it is
    renamed `test` first; a source with both val and test is refused.
    """
    splits = dict(splits)
    if fraction <= 0:
        return splits
    if not 0 < fraction < 1:
        raise ValueError(f"--val-from-train must lie in (0, 1), got {fraction}")
    if "val" in splits:
        if "test" in splits:
            raise ValueError("the source already has val and test splits; drop --val-from-train")
        splits["test"] = splits.pop("val")
    train = list(splits["train"])
    n_val = int(round(fraction * len(train)))
    chosen = set(np.random.default_rng(seed).permutation(len(train))[:n_val].tolist())
    splits["val"] = [k for i, k in enumerate(train) if i in chosen]
    splits["train"] = [k for i, k in enumerate(train) if i not in chosen]
    return splits


def convert(
    src: str,
    out: str,
    *,
    layout: str | None = None,
    size: int = 256,
    shard_size: int = 256,
    workers: int | None = None,
    skip_bad: bool = False,
    tasks=None,
    val_from_train: float = 0.0,
    seed: int = 0,
    mat: str | None = None,
    mapping: str | None = None,
    split_file: str | None = None,
    log=print,
) -> str:
    """Convert one NYU-v2 source folder into shards + manifest under `out`; return the manifest path."""
    from data_prep.shards import prepare_out_dir, write_manifest, write_split

    if not os.path.isdir(src):
        what = "is not a directory" if os.path.exists(src) else "does not exist"
        raise ValueError(f"{src}: the source directory {what}; pass --src DIR, the folder holding the raw NYU-v2 data")
    layout = layout or detect_layout(src)
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    available = LAYOUT_TASKS[layout]
    tasks = tuple(available if tasks is None else tasks)
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ValueError(f"tasks {unknown} are not available in the {layout} layout (available: {available})")
    extra = {"label_mapping": "0 -> 255 (ignore), k -> k-1" if layout != "mtan" else "-1 -> 255 (ignore)"}
    if layout == "nyud_mt":
        splits = read_nyud_mt_splits(src)
        for task, folder in (("seg", "segmentation"), ("depth", "depth"), ("normals", "normals"), ("edge", "edge")):
            if task in tasks and not os.path.isdir(os.path.join(src, folder)):
                raise ValueError(
                    f"{os.path.join(src, folder)}: missing folder for task {task}; restore it or "
                    f"leave the task out with --tasks"
                )
        build = functools.partial(nyud_mt_example, src=src, size=size, tasks=tasks)
        source_files = functools.partial(nyud_mt_files, src=src, tasks=tasks)
    elif layout == "mtan":
        splits = read_mtan_splits(src)
        build = functools.partial(mtan_example, src=src, size=size, tasks=tasks)
        source_files = functools.partial(mtan_files, src=src, tasks=tasks)
        extra["split_note"] = "MTAN/LibMTL folder 'val' (standard 654-image test set) written as split 'test'"
    else:
        mat = mat or os.path.join(src, MAT_FILE_NAME)
        num_images = check_mat_file(mat)
        mapping = mapping or _find_first(src, MAPPING_FILE_NAMES)
        split_file = split_file or _find_first(src, SPLIT_FILE_NAMES)
        if mapping is None and "seg" in tasks:
            raise ValueError(
                f"{src}: no 894->40 class mapping found (looked for {', '.join(MAPPING_FILE_NAMES)}); "
                "pass --mapping FILE"
            )
        if split_file is None:
            raise ValueError(
                f"{src}: no split file found (looked for {', '.join(SPLIT_FILE_NAMES)}); pass "
                "--split-file FILE (splits.mat with trainNdxs/testNdxs, 1-based)"
            )
        table = load_class_mapping(mapping) if "seg" in tasks else np.zeros(1, np.int64)
        splits = load_mat_splits(split_file)
        too_big = [i for ids in splits.values() for i in ids if i > num_images]
        if too_big:
            raise ValueError(f"{split_file}: index {too_big[0]} exceeds the {num_images} images of {mat}")
        build = functools.partial(mat_example, mat_path=os.path.abspath(mat), mapping=table, size=size, tasks=tasks)
        source_files = functools.partial(
            mat_files,
            mat_path=os.path.abspath(mat),
            mapping_path=os.path.abspath(mapping) if "seg" in tasks else None,
        )
        extra.update(
            normals="computed from depth: back-projection with NYU Kinect intrinsics, central differences",
            intrinsics=NYU_KINECT_INTRINSICS,
        )
        log(f"[nyu] normals are computed from depth ({mat} has none); edges are not available in this layout")
    splits = carve_val_from_train(splits, val_from_train, seed)
    if "val" not in splits:
        log(
            f"[nyu] the source has no val split (splits: {sorted(splits)}); pass --val-from-train 0.1 to carve one "
            "from train for early stopping"
        )
    prepare_out_dir(out)
    num_classes = {"seg": LAYOUT_NUM_CLASSES[layout]} if "seg" in tasks else {}
    entries = {}
    for split in SPLITS:
        if split in splits:
            entries[split] = write_split(
                out,
                split,
                [str(k) for k in splits[split]],
                build,
                shard_size=shard_size,
                num_workers=workers,
                skip_bad=skip_bad,
                image_size=(size, size),
                num_classes=num_classes,
                desc=f"nyu {split}",
                source_files=source_files,
            )
            raw_io.report_skipped(entries[split], split, log)
    features = ("image",) + tasks
    manifest_path = write_manifest(
        out,
        dataset="nyuv2",
        source_layout=layout,
        image_size=(size, size),
        features=features,
        num_classes=num_classes,
        splits=entries,
        extra=extra,
    )
    from data_prep import tfds_meta

    tfds_meta.write_tfds_metadata(out)  # dataset_info.json + features.json: tfds reads the shards too
    return manifest_path


def main(argv=None) -> int:
    """The command line; every error ends as one `error:` line and exit code 2 (see mtl_sparse_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.nyu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="folder holding the raw dataset")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--layout", choices=LAYOUTS, help="default: detected from --src")
    parser.add_argument("--size", type=int, default=256, help="examples are resized to size × size")
    parser.add_argument("--shard-size", type=int, default=256, help="examples per shard")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and report bad examples instead of stopping")
    parser.add_argument("--tasks", help=f"comma-separated subset of {ALL_TASKS} (default: all the layout has)")
    parser.add_argument(
        "--val-from-train",
        type=float,
        default=0.0,
        help="carve this seeded fraction of train into a val split when the source has none",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --val-from-train")
    parser.add_argument("--mat", help=f"mat layout: path of {MAT_FILE_NAME} (default: in --src)")
    parser.add_argument("--mapping", help="mat layout: 894->40 mapping (classMapping40.mat / .npy / .txt / .json)")
    parser.add_argument("--split-file", help="mat layout: splits.mat (trainNdxs/testNdxs, 1-based) or .json")
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    path = convert(
        args.src,
        args.out,
        layout=args.layout,
        size=args.size,
        shard_size=args.shard_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
        tasks=tasks,
        val_from_train=args.val_from_train,
        seed=args.seed,
        mat=args.mat,
        mapping=args.mapping,
        split_file=args.split_file,
    )
    print(f"[nyu] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
