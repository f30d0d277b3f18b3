"""Procedural multi-task demo dataset: rendered rooms whose seg, depth, normals, edges and RGB agree.

Each image is ray-cast from a pinhole camera (pitched slightly down) into a room: a floor, a ceiling, a back
wall and two side walls, with one to four objects (spheres, yawed boxes resting on the floor, tilted
rectangular panels). Every target follows from the same geometry:

* depth   z-depth of the first hit, in metres; a few images get a sensor-like hole (depth 0, normals 0);
* normals the surface normal of the hit in the camera frame (x right, y down, z forward), unit length and
          facing the camera;
* seg     the class of the hit: 0 wall, 1 floor, 2 ceiling, 3 sphere, 4 box, 5 panel (the first
          `num_classes` of these are used, at least 4);
* edge    1 where a 4-neighbour has another class or a depth more than EDGE_REL_DEPTH_JUMP away, relative
          to the nearer of the two (computed before holes are cut);
* image   class albedo with a texture, Lambert-shaded by the normals under a directional light, plus noise.

Written with `data_prep.shards` (dataset 'synthetic'), so the training pipeline reads it like NYU-v2. The
manifest's `extra` records the intrinsics, so that depth can be back-projected to 3-D points.

    python -m data_prep.synthetic --out data/synthetic [--num-train 768 --num-val 128 --num-test 128
        --size 64 --seed 0 --num-classes 6 --shard-size 256]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from data_prep import shards
from mtl_sparse_jax import cli
from mtl_sparse_jax.data import spec as data_spec

CLASS_NAMES = ("wall", "floor", "ceiling", "sphere", "box", "panel")
WALL, FLOOR, CEILING, SPHERE, BOX, PANEL = range(6)
MIN_CLASSES = 4
EDGE_REL_DEPTH_JUMP = 0.2
FOCAL_PER_WIDTH = 1.0  # focal length in pixels = FOCAL_PER_WIDTH * width: a ~53 degree horizontal field of view
HOLE_PROBABILITY = 0.3
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
GENERATOR_VERSION = 1

# Base albedo per class (RGB in [0,1]); objects get a random tint on top.
CLASS_ALBEDO = np.array(
    [
        [0.80, 0.76, 0.66],  # wall
        [0.55, 0.38, 0.24],  # floor
        [0.92, 0.92, 0.95],  # ceiling
        [0.85, 0.20, 0.18],  # sphere
        [0.20, 0.45, 0.85],  # box
        [0.25, 0.70, 0.30],  # panel
    ]
)


def intrinsics(image_size: int) -> tuple[float, float, float]:
    """(focal_px, cx, cy); pixel (row i, column j) has its centre at (u, v) = (j + 0.5, i + 0.5)."""
    return FOCAL_PER_WIDTH * image_size, image_size / 2.0, image_size / 2.0


def camera_rays(image_size: int) -> np.ndarray:
    """Ray directions [S,S,3] in the camera frame, scaled so that the z component is 1 (t = z-depth)."""
    focal, cx, cy = intrinsics(image_size)
    centres = np.arange(image_size) + 0.5
    u, v = np.meshgrid(centres, centres)
    return np.stack([(u - cx) / focal, (v - cy) / focal, np.ones_like(u)], axis=-1)


def _rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_plane(rays, normal, offset):
    """t where rays hit {X: normal.X = offset} in front of the camera (inf elsewhere)."""
    denominator = rays @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = offset / denominator
    return np.where((t > 1e-6) & np.isfinite(t), t, np.inf)


def _hit_sphere(rays, centre, radius):
    a = np.einsum("...k,...k->...", rays, rays)
    b = rays @ centre
    c = centre @ centre - radius**2
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (b - np.sqrt(disc)) / a
    t = np.where((disc > 0) & (t > 1e-6), t, np.inf)
    normals = (rays * t[..., None] - centre) / radius
    return t, normals


def _hit_box(rays, centre, half, rotation):
    """Slab test of an oriented box: world = rotation @ local + centre."""
    local_rays = rays @ rotation  # = (rotation.T @ ray) for every ray
    local_origin = rotation.T @ (-centre)
    safe = np.where(np.abs(local_rays) < 1e-12, 1e-12, local_rays)
    t1 = (-half - local_origin) / safe
    t2 = (half - local_origin) / safe
    t_near_axes = np.minimum(t1, t2)
    t_near = t_near_axes.max(axis=-1)
    t_far = np.maximum(t1, t2).min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    axis = t_near_axes.argmax(axis=-1)
    local_normals = np.zeros_like(rays)
    sign = -np.sign(np.take_along_axis(local_rays, axis[..., None], axis=-1))[..., 0]
    np.put_along_axis(local_normals, axis[..., None], sign[..., None], axis=-1)
    return np.where(hit, t_near, np.inf), local_normals @ rotation.T


def _hit_panel(rays, centre, normal, e1, e2, half):
    t = _hit_plane(rays, normal, normal @ centre)
    with np.errstate(invalid="ignore"):
        offsets = rays * np.where(np.isfinite(t), t, 0.0)[..., None] - centre
    inside = (np.abs(offsets @ e1) <= half[0]) & (np.abs(offsets @ e2) <= half[1])
    return np.where(inside, t, np.inf)


def render_scene(rng: np.random.Generator, image_size: int, num_classes: int = 6) -> dict:
    """One random scene -> {'image', 'seg', 'depth', 'normals', 'edge'} arrays of the shard spec's dtypes."""
    if not MIN_CLASSES <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in {MIN_CLASSES}..{len(CLASS_NAMES)}, got {num_classes}")
    pitch = rng.uniform(0.0, np.deg2rad(15.0))
    # camera -> world: looking down by `pitch` (y points down, so forward tilts towards +y).
    cam_to_world = np.array(
        [[1.0, 0.0, 0.0], [0.0, np.cos(pitch), np.sin(pitch)], [0.0, -np.sin(pitch), np.cos(pitch)]]
    )
    rays = camera_rays(image_size) @ cam_to_world.T  # world-frame directions, t is still camera z-depth

    floor_y, ceiling_y = rng.uniform(1.0, 1.6), -rng.uniform(1.2, 2.0)
    back_z, left_x, right_x = rng.uniform(6.0, 10.0), -rng.uniform(2.5, 4.0), rng.uniform(2.5, 4.0)
    # Planes as (class, inward normal n, offset c) with n.X = c; inward normals face the camera at the origin.
    planes = [
        (WALL, np.array([0.0, 0.0, -1.0]), -back_z),
        (WALL, np.array([1.0, 0.0, 0.0]), left_x),
        (WALL, np.array([-1.0, 0.0, 0.0]), -right_x),
        (FLOOR, np.array([0.0, -1.0, 0.0]), -floor_y),
        (CEILING, np.array([0.0, 1.0, 0.0]), ceiling_y),
    ]
    hits = []  # (t [H,W], class, normals [3] or [H,W,3], albedo [3]); the nearest hit per pixel wins

    def composite(t, cls, surface_normals, colour):
        hits.append((t, cls, surface_normals, colour))

    for cls, normal, offset in planes:
        composite(_hit_plane(rays, normal, offset), cls, normal, CLASS_ALBEDO[cls])

    object_classes = list(range(SPHERE, num_classes))
    for _ in range(rng.integers(1, 5)):
        cls = object_classes[rng.integers(len(object_classes))]
        z = rng.uniform(2.5, back_z - 1.0)
        x = rng.uniform(-0.35, 0.35) * z
        colour = np.clip(CLASS_ALBEDO[cls] + rng.uniform(-0.12, 0.12, 3), 0.0, 1.0)
        if cls == SPHERE:
            radius = rng.uniform(0.3, 0.8)
            centre = np.array([x, floor_y - radius - rng.uniform(0.0, 0.6), z])
            t, sphere_normals = _hit_sphere(rays, centre, radius)
            composite(t, cls, sphere_normals, colour)
        elif cls == BOX:
            half = rng.uniform(0.25, 0.7, 3)
            centre = np.array([x, floor_y - half[1], z])
            t, box_normals = _hit_box(rays, centre, half, _rotation_y(rng.uniform(0, np.pi)))
            composite(t, cls, box_normals, colour)
        else:
            yaw, tilt = rng.uniform(-0.9, 0.9), rng.uniform(-0.7, 0.7)
            rotation = _rotation_y(yaw) @ np.array(
                [[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]
            )
            e1, e2, normal = rotation[:, 0], rotation[:, 1], rotation[:, 2]
            centre = np.array([x, floor_y - rng.uniform(0.5, 1.3), z])
            if normal @ centre > 0:  # face the camera
                normal = -normal
            t = _hit_panel(rays, centre, normal, e1, e2, rng.uniform(0.3, 0.8, 2))
            composite(t, cls, normal, colour)

    all_t = np.stack([hit[0] for hit in hits])
    nearest = np.argmin(all_t, axis=0)  # ties go to the earlier surface
    depth = np.take_along_axis(all_t, nearest[None], axis=0)[0]  # finite: the room is closed all round
    seg = np.array([hit[1] for hit in hits], np.uint8)[nearest]
    albedo = np.stack([hit[3] for hit in hits])[nearest]
    normals = np.zeros(depth.shape + (3,))
    for index, hit in enumerate(hits):
        mask = nearest == index
        normals[mask] = hit[2][mask] if hit[2].ndim == 3 else hit[2]
    hit_points = rays * depth[..., None]
    normals_cam = normals @ cam_to_world  # world -> camera is the transpose: n_cam = R^T n_world

    # Texture in world coordinates: a checkerboard on the floor, stripes on walls, mottling on objects.
    checker = (np.floor(hit_points[..., 0] / 0.5) + np.floor(hit_points[..., 2] / 0.5)) % 2
    stripes = (np.floor((hit_points[..., 0] + hit_points[..., 2]) / 0.4)) % 2
    texture = np.where(seg == FLOOR, 0.8 + 0.3 * checker, np.where(seg == WALL, 0.92 + 0.1 * stripes, 1.0))
    light = np.array([-0.35, -1.0, 0.45]) + rng.uniform(-0.3, 0.3, 3)
    light /= np.linalg.norm(light)
    shading = 0.3 + 0.7 * np.clip(normals @ light, 0.0, None)
    rgb = albedo * (texture * shading)[..., None] + rng.normal(0.0, 0.015, albedo.shape)
    image = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)

    edge = edges_from_labels_and_depth(seg, depth)

    if rng.random() < HOLE_PROBABILITY:  # a sensor dropout: invalid depth and normals, as in NYU-v2
        rows, cols = np.mgrid[0:image_size, 0:image_size]
        ci, cj = rng.uniform(0, image_size, 2)
        ri, rj = rng.uniform(0.04, 0.12, 2) * image_size
        hole = ((rows + 0.5 - ci) / ri) ** 2 + ((cols + 0.5 - cj) / rj) ** 2 <= 1.0
        depth = np.where(hole, 0.0, depth)
        normals_cam = np.where(hole[..., None], 0.0, normals_cam)

    return {
        "image": image,
        "seg": seg,
        "depth": depth.astype(np.float32),
        "normals": normals_cam.astype(np.float32),
        "edge": edge.astype(np.float32),
    }


def edges_from_labels_and_depth(seg: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """bool [H,W]: pixels with a 4-neighbour of another class or a relative depth jump > EDGE_REL_DEPTH_JUMP."""
    edge = np.zeros(seg.shape, bool)
    for axis in (0, 1):
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        a_seg, b_seg, a_depth, b_depth = seg[tuple(lo)], seg[tuple(hi)], depth[tuple(lo)], depth[tuple(hi)]
        jump = np.abs(a_depth - b_depth) > EDGE_REL_DEPTH_JUMP * np.minimum(a_depth, b_depth)
        boundary = (a_seg != b_seg) | jump
        edge[tuple(lo)] |= boundary
        edge[tuple(hi)] |= boundary
    return edge


def build_example(key: str, *, seed: int, image_size: int, num_classes: int) -> dict:
    """Key 's<seed>-<split>-<index>' -> one example; its randomness depends only on (seed, split, index)."""
    key_seed, split, index = key.split("-")
    if key_seed != f"s{seed}":
        raise ValueError(f"key {key!r} was made for another seed than {seed}")
    rng = np.random.default_rng([seed, SPLIT_CODES.get(split, 3), int(index)])
    example = render_scene(rng, image_size, num_classes)
    example["id"] = f"synthetic-{key}"
    return example


def generate(
    out_dir: str,
    *,
    num_train: int = 768,
    num_val: int = 128,
    num_test: int = 128,
    image_size: int = 64,
    seed: int = 0,
    num_classes: int = 6,
    shard_size: int = 256,
    num_workers: int | None = 0,
    force: bool = False,
) -> str:
    """Writes the demo dataset to `out_dir` and returns its manifest path.

    Returns at once when `out_dir` already holds a finished dataset with the same parameters (`force`
    rewrites it); an interrupted run resumes. num_workers=0 renders in this process, which is fastest for
    demo sizes since each worker process pays the TensorFlow import.
    """
    if not MIN_CLASSES <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in {MIN_CLASSES}..{len(CLASS_NAMES)}, got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(n <= 0 for n in counts.values()):
        raise ValueError(f"every split needs at least one example, got {counts}")
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_classes": num_classes,
        "counts": counts,
        "shard_size": shard_size,
    }
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory; pass a new or existing directory as --out")
    manifest_path = os.path.join(out_dir, data_spec.MANIFEST_NAME)
    if not force and os.path.isfile(manifest_path):
        try:
            existing = data_spec.load_manifest(out_dir, verify="size")
            if existing.get("extra", {}).get("generator") == parameters:
                return manifest_path
        except data_spec.DataError:
            pass  # rewrite below; finished shards are kept
    os.makedirs(out_dir, exist_ok=True)
    builder = functools.partial(build_example, seed=seed, image_size=image_size, num_classes=num_classes)
    splits = {}
    for split, count in counts.items():
        # The seed is part of the key, so that shards of another seed are never taken as finished.
        keys = [f"s{seed}-{split}-{index:06d}" for index in range(count)]
        splits[split] = shards.write_split(
            out_dir,
            split,
            keys,
            builder,
            shard_size=shard_size,
            num_workers=num_workers,
            image_size=(image_size, image_size),
            num_classes={"seg": num_classes},
            desc=f"synthetic {split}",
            overwrite=force,
        )
    focal, cx, cy = intrinsics(image_size)
    manifest_path = shards.write_manifest(
        out_dir,
        dataset="synthetic",
        source_layout="procedural",
        image_size=(image_size, image_size),
        features=["image", "seg", "depth", "normals", "edge"],
        num_classes={"seg": num_classes},
        splits=splits,
        extra={
            "generator": parameters,
            "class_names": list(CLASS_NAMES[:num_classes]),
            "focal_px": focal,
            "principal_point": [cx, cy],
            "pixel_centre": "(u, v) = (column + 0.5, row + 0.5)",
            "normals_frame": "camera: x right, y down, z forward; unit, facing the camera; (0,0,0) = invalid",
            "depth": "z-depth in metres; 0 = invalid (sensor-like holes)",
            "edge_rule": f"class change or relative depth jump > {EDGE_REL_DEPTH_JUMP} to a 4-neighbour",
        },
    )
    from data_prep import tfds_meta

    tfds_meta.write_tfds_metadata(out_dir)  # dataset_info.json + features.json: tfds reads the shards too
    return manifest_path


def main(argv=None) -> int:
    """The command line; every error ends as one `error:` line and exit code 2 (see mtl_sparse_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created; an interrupted run resumes)")
    parser.add_argument("--num-train", type=int, default=768)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--num-test", type=int, default=128)
    parser.add_argument("--size", type=int, default=64, help="image height = width, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-classes",
        type=int,
        default=6,
        help=f"{MIN_CLASSES}..{len(CLASS_NAMES)}: " + ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES)),
    )
    parser.add_argument("--shard-size", type=int, default=256, help="examples per shard")
    parser.add_argument("--num-workers", type=int, default=0, help="worker processes (0: this process)")
    parser.add_argument("--force", action="store_true", help="rewrite every shard")
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    args = parser.parse_args(argv)
    path = generate(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.size,
        seed=args.seed,
        num_classes=args.num_classes,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        force=args.force,
    )
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    counts = {split: entry["num_examples"] for split, entry in manifest["splits"].items()}
    print(f"wrote {path}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
