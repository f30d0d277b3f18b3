"""Convert CelebAMask-HQ, from the raw release, into TFRecord shards with the paper's five tasks.

    python -m data_prep.celeba --src DIR --out DIR [--split-json FILE] [--seed 0] [--size 256]
                               [--reference-subset] [--mask-source auto|parts|npy] [--shard-size N]
                               [--workers N] [--skip-bad]

Raw layout under --src:
  CelebA-HQ-img/<n>.jpg                                     1024×1024 photos (grayscale files become RGB)
  CelebAMask-HQ-mask-anno/<n // 2000>/<n:05d>_<part>.png     512×512 binary masks of 18 face parts
  CelebAMask-HQ-attribute-anno.txt                          count line, 40 names, rows '<n>.jpg ±1 ...'
  CelebA-HQ-segmask/<n:05d>_mask.npy                        optional: pre-built 3-class masks (0/1/2)

Tasks: seg (0 background, 1 hair, 2 skin; built by `mask_from_parts`), male, smile, eyebrows, glasses (attributes
Male, Smiling, Arched_Eyebrows, Eyeglasses; −1 → 0, +1 → 1). Splits: the paper's seeded 60/20/20 random split, or
a JSON with train/val/test lists of '<n>.jpg' names (like the authors' celebA_datasplit.json). --reference-subset
keeps the first third of each list, which is all the authors' loader ever reads (7000/1500/1500 of their JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

import numpy as np
from PIL import Image

from data_prep import raw_io
from data_prep.raw_io import BadExampleError
from data_prep.resize import resize_image_uint8, resize_nearest
from mtl_sparse_jax import cli

IMAGE_DIR = "CelebA-HQ-img"
PARTS_DIR = "CelebAMask-HQ-mask-anno"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
SEGMASK_DIR = "CelebA-HQ-segmask"
IMAGES_PER_PART_FOLDER = 2000
SPLITS = ("train", "val", "test")
RANDOM_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
MASK_SOURCES = ("auto", "parts", "npy")

# Task name → attribute column of the annotation file.
ATTRIBUTE_TASKS = {"male": "Male", "smile": "Smiling", "eyebrows": "Arched_Eyebrows", "glasses": "Eyeglasses"}
TASKS = ("seg",) + tuple(ATTRIBUTE_TASKS)

BACKGROUND, HAIR, SKIN = 0, 1, 2
NUM_SEG_CLASSES = 3
# The official painting order of CelebAMask-HQ's g_mask.py: a later part overwrites an earlier one.
PART_ORDER = (
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
    "hair",
    "hat",
    "ear_r",
    "neck_l",
    "neck",
    "cloth",
)
# "Skin" is the visible face: skin plus every facial feature drawn on it (nose, eyes, brows, ears, mouth, lips).
# Neck, clothes and accessories (glasses, hat, earring, necklace) are background.
SKIN_PARTS = ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip")
HAIR_PARTS = ("hair",)
PART_CLASS = {part: SKIN if part in SKIN_PARTS else HAIR if part in HAIR_PARTS else BACKGROUND for part in PART_ORDER}

_NAME_RE = re.compile(r"^(\d+)\.jpg$")


# ---------------------------------------------------------------------------------------------------- attributes


def parse_attribute_file(path: str) -> dict[int, dict[str, int]]:
    """Image number → {task: 0/1} from CelebAMask-HQ-attribute-anno.txt.

    Line 1 is the image count, line 2 the attribute names, then one row per image: '<n>.jpg' and one ±1 per name,
    separated by one or more spaces. Any deviation (wrong count, short row, value other than ±1, missing column,
    duplicate image) raises ValueError naming the file and line.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: attribute file not found; it ships with CelebAMask-HQ as {ATTRIBUTE_FILE}")
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise ValueError(
            f"{path}:1: first line {lines[0][:40]!r} is not the image count; use the raw release file "
            "(count line, header, rows)"
        ) from None
    names = lines[1].split()
    missing = [col for col in ATTRIBUTE_TASKS.values() if col not in names]
    if missing:
        raise ValueError(f"{path}:2: header lacks attribute(s) {missing}")
    columns = {task: names.index(col) for task, col in ATTRIBUTE_TASKS.items()}
    attributes: dict[int, dict[str, int]] = {}
    for line_no, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        match = _NAME_RE.match(tokens[0])
        if not match:
            raise ValueError(f"{path}:{line_no}: row starts with {tokens[0]!r}, expected '<n>.jpg'")
        if len(tokens) != len(names) + 1:
            raise ValueError(f"{path}:{line_no}: row has {len(tokens) - 1} values for {len(names)} attributes")
        values = tokens[1:]
        if any(v not in ("1", "-1") for v in values):
            bad = next(v for v in values if v not in ("1", "-1"))
            raise ValueError(f"{path}:{line_no}: value {bad!r} is not -1 or 1")
        number = int(match.group(1))
        if number in attributes:
            raise ValueError(f"{path}:{line_no}: image {tokens[0]} appears twice")
        attributes[number] = {task: 1 if values[col] == "1" else 0 for task, col in columns.items()}
    if len(attributes) != count:
        raise ValueError(
            f"{path}: the count line says {count} images but {len(attributes)} rows follow; the file is "
            "truncated or edited"
        )
    return attributes


_ATTRIBUTE_CACHE: dict[str, dict] = {}


def _attributes(path: str) -> dict[int, dict[str, int]]:
    # Parsed once per worker process, so that each shard job carries only the file name, not 30000 rows.
    if path not in _ATTRIBUTE_CACHE:
        _ATTRIBUTE_CACHE[path] = parse_attribute_file(path)
    return _ATTRIBUTE_CACHE[path]


# ---------------------------------------------------------------------------------------------------------- masks


def mask_from_parts(part_masks: dict[str, np.ndarray]) -> np.ndarray:
    """3-class mask (uint8: 0 background, 1 hair, 2 skin) from boolean part masks.

    Parts are painted in the official order `PART_ORDER`, each with its class `PART_CLASS`, so a later part
    overwrites an earlier one: hair drawn over skin is hair, a hat over hair is background, and the eyes (drawn after
    the glasses) show through them as skin.
    """
    if not part_masks:
        raise ValueError("no part masks given")
    unknown = sorted(set(part_masks) - set(PART_ORDER))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; known parts are {PART_ORDER}")
    shape = next(iter(part_masks.values())).shape
    mask = np.full(shape, BACKGROUND, np.uint8)
    for part in PART_ORDER:
        if part in part_masks:
            mask[np.asarray(part_masks[part], bool)] = PART_CLASS[part]
    return mask


def part_mask_path(src: str, number: int, part: str) -> str:
    return os.path.join(src, PARTS_DIR, str(number // IMAGES_PER_PART_FOLDER), f"{number:05d}_{part}.png")


def read_part_mask(path: str) -> np.ndarray:
    """A part PNG (gray, palette, RGB or 16-bit; values 0 / non-zero) → bool [H, W]."""
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img)
    except Exception as err:
        raise BadExampleError(
            f"{path}: cannot decode part mask ({type(err).__name__}: {err}); re-extract the file"
        ) from None
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1)
    if array.ndim != 2:
        raise BadExampleError(f"{path}: part mask has shape {array.shape}; expected [H, W]")
    return array != 0


def read_parts(src: str, number: int) -> dict[str, np.ndarray]:
    """The part masks of one image; a part without a file is absent from the image (that is normal)."""
    parts = {}
    for part in PART_ORDER:
        path = part_mask_path(src, number, part)
        if os.path.isfile(path):
            parts[part] = read_part_mask(path)
    if not parts:
        raise BadExampleError(
            f"{part_mask_path(src, number, '<part>')}: no part mask of image {number} found; "
            "restore its annotation files or leave the image out of the split"
        )
    shapes = {part: m.shape for part, m in parts.items()}
    if len(set(shapes.values())) > 1:
        raise BadExampleError(f"{part_mask_path(src, number, '*')}: part masks differ in size {shapes}")
    return parts


def segmask_path(src: str, number: int) -> str:
    return os.path.join(src, SEGMASK_DIR, f"{number:05d}_mask.npy")


def read_segmask(path: str) -> np.ndarray:
    """A pre-built 3-class mask .npy: 2-D, integer dtype, values in {0, 1, 2} → uint8."""
    mask = raw_io.read_npy(path, "segmask")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise BadExampleError(f"{path}: segmask has shape {mask.shape}; expected [H, W]")
    if mask.dtype.kind not in "iub":
        raise BadExampleError(
            f"{path}: segmask has dtype {mask.dtype}; expected integer class ids 0/1/2 (a float "
            "or resized mask would silently change labels)"
        )
    if mask.size and (mask.min() < 0 or mask.max() > NUM_SEG_CLASSES - 1):
        raise BadExampleError(
            f"{path}: segmask values span [{mask.min()}, {mask.max()}]; expected 0 background, 1 hair, 2 skin"
        )
    return mask.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------- splits


def random_split(numbers, seed: int, fractions=RANDOM_SPLIT_FRACTIONS) -> dict[str, list[int]]:
    """Seeded random split of the sorted image numbers: train/val get floor(f·N), test the rest."""
    numbers = sorted(numbers)
    order = np.random.default_rng(seed).permutation(len(numbers))
    n_train = int(fractions[0] * len(numbers))
    n_val = int(fractions[1] * len(numbers))
    shuffled = [numbers[i] for i in order]
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def read_split_json(path: str, known_numbers) -> dict[str, list[int]]:
    """train/val/test lists of '<n>.jpg' names (list order kept); every name must be annotated, lists disjoint."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: split JSON not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in SPLITS):
        raise ValueError(f"{path}: expected an object with lists 'train', 'val' and 'test' of '<n>.jpg' names")
    known = set(known_numbers)
    splits, seen = {}, {}
    for split in SPLITS:
        numbers = []
        for name in data[split]:
            match = _NAME_RE.match(str(name))
            if not match:
                raise ValueError(f"{path}: {split} entry {name!r} is not '<n>.jpg'")
            number = int(match.group(1))
            if number not in known:
                raise ValueError(f"{path}: {split} entry {name!r} has no row in {ATTRIBUTE_FILE}")
            if number in seen:
                raise ValueError(f"{path}: {name!r} is in both {seen[number]} and {split}; splits must be disjoint")
            seen[number] = split
            numbers.append(number)
        splits[split] = numbers
    return splits


def reference_subset(splits: dict[str, list]) -> dict[str, list]:
    """The first int(len/3) entries of each list: the authors' loader reports len/3 and so never reads the rest."""
    return {split: list(keys[: int(len(keys) / 3)]) for split, keys in splits.items()}


# -------------------------------------------------------------------------------------------------------- examples


def celeba_example(key: str, *, src: str, size: int, attribute_file: str, mask_source: str = "parts") -> dict:
    """Read, validate, build and resize one CelebAMask-HQ example by image number."""
    number = int(key)
    image_path = os.path.join(src, IMAGE_DIR, f"{number}.jpg")
    image = raw_io.read_rgb(image_path)
    if mask_source == "npy":
        mask_path = segmask_path(src, number)
        mask = read_segmask(mask_path)
    else:
        mask_path = part_mask_path(src, number, "*")
        mask = mask_from_parts(read_parts(src, number))
    # The raw release pairs 1024² photos with 512² masks, so sizes may differ, but the aspect ratio may not.
    (ih, iw), (mh, mw) = image.shape[:2], mask.shape
    if ih * mw != iw * mh:
        raise BadExampleError(
            f"{mask_path}: mask is {mh}×{mw} but image {image_path} is {ih}×{iw} (another aspect "
            "ratio); the files do not belong together"
        )
    attributes = _attributes(attribute_file)
    if number not in attributes:
        raise BadExampleError(f"{attribute_file}: no row for {number}.jpg")
    example = {
        "id": str(number),
        "image": resize_image_uint8(image, size, size),
        "seg": resize_nearest(mask, size, size).astype(np.uint8),
    }
    example.update(attributes[number])
    return example


def celeba_files(key: str, *, src: str, attribute_file: str, mask_source: str = "parts") -> list[str]:
    """The files `celeba_example` reads for `key`, absent part masks included (for the source fingerprint)."""
    number = int(key)
    paths = [os.path.join(src, IMAGE_DIR, f"{number}.jpg"), attribute_file]
    if mask_source == "npy":
        paths.append(segmask_path(src, number))
    else:
        paths.extend(part_mask_path(src, number, part) for part in PART_ORDER)
    return paths


# --------------------------------------------------------------------------------------------------------- driver


def convert(
    src: str,
    out: str,
    *,
    split_json: str | None = None,
    seed: int = 0,
    size: int = 256,
    use_reference_subset: bool = False,
    mask_source: str = "auto",
    shard_size: int = 256,
    workers: int | None = None,
    skip_bad: bool = False,
    log=print,
) -> str:
    """Convert a CelebAMask-HQ folder into shards + manifest under `out`; return the manifest path."""
    from data_prep.shards import prepare_out_dir, write_manifest, write_split

    if mask_source not in MASK_SOURCES:
        raise ValueError(f"--mask-source must be one of {MASK_SOURCES}, got {mask_source!r}")
    if not os.path.isdir(src):
        what = "is not a directory" if os.path.exists(src) else "does not exist"
        raise ValueError(f"{src}: the source directory {what}; pass --src DIR, the CelebAMask-HQ folder")
    if not os.path.isdir(os.path.join(src, IMAGE_DIR)):
        raise ValueError(f"{os.path.join(src, IMAGE_DIR)}: not found; --src must be the CelebAMask-HQ folder")
    if mask_source == "auto":
        mask_source = "npy" if os.path.isdir(os.path.join(src, SEGMASK_DIR)) else "parts"
    mask_dir = os.path.join(src, SEGMASK_DIR if mask_source == "npy" else PARTS_DIR)
    if not os.path.isdir(mask_dir):
        raise ValueError(f"{mask_dir}: not found; the segmentation masks are needed")
    attribute_file = os.path.abspath(os.path.join(src, ATTRIBUTE_FILE))
    attributes = parse_attribute_file(attribute_file)
    if split_json:
        splits = read_split_json(split_json, attributes)
        split_source = f"json:{os.path.basename(split_json)}"
    else:
        splits = random_split(attributes, seed)
        split_source = f"random 60/20/20, seed {seed}"
    if use_reference_subset:
        splits = reference_subset(splits)
        split_source += ", reference subset (first third of each list)"
    build = functools.partial(
        celeba_example, src=os.path.abspath(src), size=size, attribute_file=attribute_file, mask_source=mask_source
    )
    source_files = functools.partial(
        celeba_files, src=os.path.abspath(src), attribute_file=attribute_file, mask_source=mask_source
    )
    prepare_out_dir(out)
    num_classes = {"seg": NUM_SEG_CLASSES}
    entries = {}
    for split in SPLITS:
        if splits.get(split):
            entries[split] = write_split(
                out,
                split,
                [str(n) for n in splits[split]],
                build,
                shard_size=shard_size,
                num_workers=workers,
                skip_bad=skip_bad,
                image_size=(size, size),
                num_classes=num_classes,
                desc=f"celeba {split}",
                source_files=source_files,
            )
            raw_io.report_skipped(entries[split], split, log)
    extra = {
        "split": split_source,
        "mask_source": mask_source,
        "seg_classes": ["background", "hair", "skin"],
        "skin_parts": list(SKIN_PARTS),
        "part_order": list(PART_ORDER),
        "attributes": ATTRIBUTE_TASKS,
    }
    manifest_path = write_manifest(
        out,
        dataset="celebamask_hq",
        source_layout=f"raw_release+{mask_source}",
        image_size=(size, size),
        features=("image",) + TASKS,
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
    parser = argparse.ArgumentParser(prog="python -m data_prep.celeba", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="the CelebAMask-HQ folder")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--split-json", help="JSON with train/val/test lists of '<n>.jpg' (default: random 60/20/20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    parser.add_argument("--size", type=int, default=256, help="examples are resized to size × size")
    parser.add_argument(
        "--reference-subset",
        action="store_true",
        help="keep the first third of each split list, as the authors' loader does",
    )
    parser.add_argument(
        "--mask-source",
        choices=MASK_SOURCES,
        default="auto",
        help=f"parts: build from {PARTS_DIR}; npy: {SEGMASK_DIR}/<n:05d>_mask.npy; auto: npy if that folder exists",
    )
    parser.add_argument("--shard-size", type=int, default=256, help="examples per shard")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and report bad examples instead of stopping")
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    args = parser.parse_args(argv)
    path = convert(
        args.src,
        args.out,
        split_json=args.split_json,
        seed=args.seed,
        size=args.size,
        use_reference_subset=args.reference_subset,
        mask_source=args.mask_source,
        shard_size=args.shard_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
    )
    print(f"[celeba] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
