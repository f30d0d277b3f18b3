"""CelebAMask-HQ converter: a fake raw release (exact file layout and attribute format), converted and read back."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import celeba
from data_prep.shards import BadExampleError

SIZE = 8
IMG, MASK = 32, 16  # photos are twice the mask size, as 1024 vs 512 in the release
ALL_NAMES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
PARTS = [
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
]
FACE = {"skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip"}
NUMBERS = [0, 1, 7, 42, 1999, 2000, 2001, 4321, 29999, 12]


def write_attribute_file(path, values):
    """The raw release's format: a count line, a header of 40 names, then '<n>.jpg' + two spaces + ±1 values."""
    with open(path, "w") as f:
        f.write(f"{len(values)}\n")
        f.write(" ".join(ALL_NAMES) + "\n")
        for number, row in values.items():
            f.write(f"{number}.jpg  " + " ".join(str(v) for v in row) + "\n")


def expected_mask(parts):
    """Last part (in the official painting order) that covers a pixel decides: hair 1, face part 2, other 0."""
    out = np.zeros((MASK, MASK), np.uint8)
    for y in range(MASK):
        for x in range(MASK):
            covering = [p for p in PARTS if p in parts and parts[p][y, x]]
            if covering:
                last = covering[-1]
                out[y, x] = 1 if last == "hair" else 2 if last in FACE else 0
    return out


def make_release(root, numbers=NUMBERS, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "CelebA-HQ-img"))
    raw = {}
    attributes = {}
    for k, number in enumerate(numbers):
        if k == 1:  # a grayscale JPEG
            image = rng.integers(0, 256, (IMG, IMG), dtype=np.uint8)
            Image.fromarray(image, "L").save(os.path.join(root, "CelebA-HQ-img", f"{number}.jpg"))
        else:
            image = rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)
            Image.fromarray(image).save(os.path.join(root, "CelebA-HQ-img", f"{number}.jpg"))
        folder = os.path.join(root, "CelebAMask-HQ-mask-anno", str(number // 2000))
        os.makedirs(folder, exist_ok=True)
        parts = {}
        for part in PARTS:
            if part == "skin" or rng.uniform() < 0.6:
                m = rng.uniform(size=(MASK, MASK)) < 0.4
                parts[part] = m
                if k == 2 and part == "skin":  # a 16-bit part PNG
                    Image.fromarray(m.astype(np.uint16) * 65535).save(os.path.join(folder, f"{number:05d}_{part}.png"))
                else:
                    Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(folder, f"{number:05d}_{part}.png"))
        attributes[number] = rng.choice([-1, 1], size=len(ALL_NAMES))
        raw[number] = {"parts": parts, "attrs": dict(zip(ALL_NAMES, attributes[number]))}
    write_attribute_file(os.path.join(root, "CelebAMask-HQ-attribute-anno.txt"), attributes)
    return raw


def read_split(out_dir, split):
    import tensorflow as tf

    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    examples = []
    for shard in manifest["splits"][split]["shards"]:
        for record in tf.data.TFRecordDataset(os.path.join(out_dir, shard["file"])):
            feats = tf.train.Example.FromString(record.numpy()).features.feature
            ex = {"id": feats["id"].bytes_list.value[0].decode()}
            for name in ("image", "seg"):
                ex[name] = np.asarray(Image.open(io.BytesIO(feats[name].bytes_list.value[0])))
            for name in ("male", "smile", "eyebrows", "glasses"):
                ex[name] = int(feats[name].int64_list.value[0])
            examples.append(ex)
    return manifest, examples


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("celeba"))
    raw = make_release(root)
    out = str(tmp_path_factory.mktemp("celeba_out"))
    celeba.convert(root, out, size=SIZE, shard_size=3, workers=0, seed=0, log=lambda *_: None)
    return root, raw, out


def test_values_match_the_release(release):
    root, raw, out = release
    seen = []
    for split in ("train", "val", "test"):
        manifest, examples = read_split(out, split)
        for ex in examples:
            number = int(ex["id"])
            seen.append(number)
            r = raw[number]
            full = expected_mask(r["parts"])
            np.testing.assert_array_equal(ex["seg"], full[::2, ::2])  # legacy nearest 16 -> 8: even pixels
            for task, column in (
                ("male", "Male"),
                ("smile", "Smiling"),
                ("eyebrows", "Arched_Eyebrows"),
                ("glasses", "Eyeglasses"),
            ):
                assert ex[task] == (1 if r["attrs"][column] == 1 else 0)
            photo = np.asarray(Image.open(os.path.join(root, "CelebA-HQ-img", f"{number}.jpg")).convert("RGB"))
            # 4x bilinear downscale without antialias: the mean of the two middle pixels of each 4-block, per axis
            blocks = photo.astype(float).reshape(SIZE, 4, SIZE, 4, 3)[:, 1:3, :, 1:3].mean(axis=(1, 3))
            assert np.max(np.abs(ex["image"] - blocks)) <= 0.5 + 1e-6
    assert sorted(seen) == sorted(NUMBERS)
    assert manifest["num_classes"] == {"seg": 3}
    assert sorted(manifest["features"]) == sorted(["image", "seg", "male", "smile", "eyebrows", "glasses"])
    counts = {s: manifest["splits"][s]["num_examples"] for s in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 2, "test": 2}  # 60/20/20 of 10


def test_grayscale_jpeg_is_rgb(release):
    _, _, out = release
    for split in ("train", "val", "test"):
        for ex in read_split(out, split)[1]:
            if ex["id"] == str(NUMBERS[1]):
                assert ex["image"].shape == (SIZE, SIZE, 3)
                assert np.all(ex["image"][..., 0] == ex["image"][..., 2])
                return
    raise AssertionError("grayscale example not found")


def test_painting_order_semantics():
    m = lambda *pixels: np.isin(np.arange(6).reshape(1, 6), pixels)  # noqa: E731
    parts = {"skin": m(0, 1, 2, 3, 4), "hair": m(1, 5), "hat": m(5), "eye_g": m(2, 3), "l_eye": m(3), "neck": m(4)}
    # 0 skin; 1 hair over skin; 2 glasses frame; 3 eye seen through glasses; 4 neck; 5 hat over hair
    np.testing.assert_array_equal(celeba.mask_from_parts(parts)[0], [2, 1, 0, 2, 0, 0])


def test_attribute_parsing_errors(tmp_path):
    path = str(tmp_path / "a.txt")
    write_attribute_file(path, {1: [1] * 40, 2: [-1] * 40})
    parsed = celeba.parse_attribute_file(path)
    assert parsed == {
        1: {"male": 1, "smile": 1, "eyebrows": 1, "glasses": 1},
        2: {"male": 0, "smile": 0, "eyebrows": 0, "glasses": 0},
    }
    lines = open(path).read().splitlines()
    (tmp_path / "nocount.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="nocount.txt:1: .* not the image count"):
        celeba.parse_attribute_file(str(tmp_path / "nocount.txt"))
    (tmp_path / "count.txt").write_text("\n".join(["3"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="count line says 3 images but 2"):
        celeba.parse_attribute_file(str(tmp_path / "count.txt"))
    (tmp_path / "zero.txt").write_text("\n".join(lines[:3] + [lines[3].replace(" -1", " 0", 1)]) + "\n")
    with pytest.raises(ValueError, match="zero.txt:4: value '0'"):
        celeba.parse_attribute_file(str(tmp_path / "zero.txt"))
    (tmp_path / "short.txt").write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]]) + "\n")
    with pytest.raises(ValueError, match="short.txt:4: row has 39 values"):
        celeba.parse_attribute_file(str(tmp_path / "short.txt"))


def test_random_split_is_seeded_and_partitions():
    numbers = list(range(100, 150))
    a, b, c = celeba.random_split(numbers, 0), celeba.random_split(numbers, 0), celeba.random_split(numbers, 1)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    assert sorted(a["train"] + a["val"] + a["test"]) == numbers


def test_split_json_and_reference_subset_through_cli(tmp_path):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    numbers = NUMBERS[:9]
    make_release(root, numbers)
    split = {
        "train": [f"{n}.jpg" for n in numbers[:3]],
        "val": [f"{n}.jpg" for n in numbers[3:6]],
        "test": [f"{n}.jpg" for n in numbers[6:9]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    assert (
        celeba.main(
            [
                "--src",
                root,
                "--out",
                out,
                "--size",
                str(SIZE),
                "--workers",
                "0",
                "--split-json",
                str(tmp_path / "split.json"),
                "--reference-subset",
            ]
        )
        == 0
    )
    for name, names in split.items():
        _, examples = read_split(out, name)
        assert [ex["id"] + ".jpg" for ex in examples] == names[:1]  # first third, order kept
    (tmp_path / "overlap.json").write_text(json.dumps(dict(split, test=split["train"][:1])))
    with pytest.raises(ValueError, match="both train and test"):
        celeba.read_split_json(str(tmp_path / "overlap.json"), numbers)


def test_preformatted_segmask_npy(tmp_path):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    numbers = NUMBERS[:5]
    make_release(root, numbers)
    os.makedirs(os.path.join(root, "CelebA-HQ-segmask"))
    masks = {}
    for n in numbers:
        masks[n] = np.random.default_rng(n).integers(0, 3, (MASK, MASK)).astype(np.int64)
        np.save(os.path.join(root, "CelebA-HQ-segmask", f"{n:05d}_mask.npy"), masks[n])
    celeba.convert(root, out, size=SIZE, workers=0, log=lambda *_: None)
    manifest, _ = read_split(out, "train")
    assert manifest["extra"]["mask_source"] == "npy"
    for split in ("train", "val", "test"):
        for ex in read_split(out, split)[1]:
            np.testing.assert_array_equal(ex["seg"], masks[int(ex["id"])][::2, ::2])
    path = os.path.join(root, "CelebA-HQ-segmask", f"{numbers[0]:05d}_mask.npy")
    for bad, message in (
        (masks[numbers[0]].astype(np.float32), "dtype float32"),
        (np.full((MASK, MASK), 3, np.uint8), r"span \[3, 3\]"),
        (np.array([None, 1], dtype=object), "pickled"),
    ):
        np.save(path, bad, allow_pickle=True)
        with pytest.raises(BadExampleError, match=message) as info:
            celeba.read_segmask(path)
        assert path in str(info.value)


def test_bad_examples_name_the_file_and_skip_bad_reports(tmp_path, capsys):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    numbers = NUMBERS[:7]
    make_release(root, numbers)
    split = {"train": [f"{n}.jpg" for n in numbers[:5]], "val": [f"{numbers[5]}.jpg"], "test": [f"{numbers[6]}.jpg"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    cli = [
        "--src",
        root,
        "--out",
        out,
        "--size",
        str(SIZE),
        "--workers",
        "0",
        "--split-json",
        str(tmp_path / "split.json"),
    ]
    kwargs = dict(src=root, size=SIZE, attribute_file=os.path.join(root, "CelebAMask-HQ-attribute-anno.txt"))
    # a mask that is not the image's aspect ratio
    folder = os.path.join(root, "CelebAMask-HQ-mask-anno", "0")
    for name in os.listdir(folder):
        if name.startswith(f"{numbers[1]:05d}_"):
            Image.fromarray(np.zeros((MASK, MASK + 4), np.uint8)).save(os.path.join(folder, name))
    with pytest.raises(BadExampleError, match="aspect ratio") as info:
        celeba.celeba_example(str(numbers[1]), **kwargs)
    assert f"{numbers[1]:05d}_" in str(info.value)
    # a missing photo
    photo = os.path.join(root, "CelebA-HQ-img", f"{numbers[2]}.jpg")
    os.remove(photo)
    with pytest.raises(BadExampleError, match="missing image") as info:
        celeba.celeba_example(str(numbers[2]), **kwargs)
    assert photo in str(info.value)
    # no part masks at all
    for name in os.listdir(folder):
        if name.startswith(f"{numbers[3]:05d}_"):
            os.remove(os.path.join(folder, name))
    with pytest.raises(BadExampleError, match="no part mask"):
        celeba.celeba_example(str(numbers[3]), **kwargs)

    assert celeba.main(cli) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and f"{numbers[1]:05d}_" in err[0]
    assert celeba.main(cli + ["--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert photo in printed
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    skipped = sorted(s["key"] for entry in manifest["splits"].values() for s in entry["skipped"])
    assert skipped == sorted(str(n) for n in numbers[1:4])
    assert {s: entry["num_examples"] for s, entry in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
