"""Reading raw dataset files with validation: every failure names the file, says what is wrong and how to fix it.

The converters build examples from these readers. A problem with one example raises `BadExampleError`, which the
shard writer either reports and stops on, or (with --skip-bad) skips and records.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_prep.shards import BadExampleError

__all__ = [
    "BadExampleError",
    "read_rgb",
    "read_label_image",
    "read_npy",
    "require_file",
    "require_finite",
    "require_hw",
    "report_skipped",
]


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise BadExampleError(f"{path}: missing {what} file; restore it or drop its id from the split list")
    return path


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; grayscale, palette and RGBA images are converted to RGB."""
    require_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                raise BadExampleError(f"{path}: image is {img.mode} (16/32-bit); expected an 8-bit RGB or gray photo")
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except BadExampleError:
        raise
    except Exception as err:  # PIL raises many types for truncated / corrupt files
        raise BadExampleError(
            f"{path}: cannot decode image ({type(err).__name__}: {err}); re-extract or re-download the file"
        ) from None
    return rgb


def read_label_image(path: str, max_label: int, what: str = "label") -> np.ndarray:
    """Decode a single-channel 8- or 16-bit PNG of integer labels to int32 [H, W]; values > max_label are an error.

    A 16-bit PNG is accepted when its values fit the label range (some exports save labels as 16-bit); a colour
    (RGB) PNG is refused because a colour-coded label map cannot be turned into class ids without a palette.
    """
    require_file(path, what)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA", "LA"):
                raise BadExampleError(
                    f"{path}: {what} PNG has mode {mode}; expected a single-channel 8/16-bit "
                    "class-id image (not a colour visualisation)"
                )
            array = np.asarray(img)
    except BadExampleError:
        raise
    except Exception as err:
        raise BadExampleError(
            f"{path}: cannot decode {what} image ({type(err).__name__}: {err}); re-extract the file"
        ) from None
    if array.ndim != 2:
        raise BadExampleError(f"{path}: {what} image has shape {array.shape}; expected [H, W]")
    if array.dtype.kind == "f":  # truncating floats to ids would change labels silently
        raise BadExampleError(f"{path}: {what} image holds floating-point values; expected integer class ids")
    labels = array.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > max_label):
        raise BadExampleError(
            f"{path}: {what} values span [{labels.min()}, {labels.max()}], outside 0..{max_label}; "
            "check that the file belongs to this dataset layout"
        )
    return labels.astype(np.int32)


def read_npy(path: str, what: str) -> np.ndarray:
    """np.load with allow_pickle=False; a pickled (object) array gets an error that says how to re-save it."""
    require_file(path, what)
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise BadExampleError(
                f"{path}: {what} .npy holds a pickled object array, which is never loaded (unsafe); re-save it as a "
                "plain numeric array, e.g. np.save(path, np.asarray(x, dtype=np.float32))"
            ) from None
        raise BadExampleError(f"{path}: cannot read {what} .npy ({err})") from None
    except Exception as err:
        raise BadExampleError(
            f"{path}: cannot read {what} .npy ({type(err).__name__}: {err}); the file is truncated or not a .npy file"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise BadExampleError(
            f"{path}: {what} .npy has dtype {getattr(array, 'dtype', type(array))}; expected a numeric array"
        )
    return array


def require_finite(array: np.ndarray, path: str, what: str) -> None:
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise BadExampleError(f"{path}: {what} has {bad} NaN/inf values; mark invalid pixels with 0 instead")


def require_hw(array: np.ndarray, hw: tuple[int, int], path: str, what: str, channels: int | None = None) -> np.ndarray:
    """Check that a target has the image's height and width (and channel count); squeeze a trailing 1-channel."""
    if channels is None and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    expected = tuple(hw) if channels is None else tuple(hw) + (channels,)
    if array.shape != expected:
        raise BadExampleError(
            f"{path}: {what} has shape {array.shape} but the image needs {expected}; the files do not belong together"
        )
    return array


def report_skipped(entry: dict, split: str, log=print) -> None:
    """Print the examples a --skip-bad conversion left out of a split (the manifest lists them too)."""
    skipped = entry.get("skipped", [])
    if skipped:
        log(f"[data] {split}: skipped {len(skipped)} bad example(s) (also listed in manifest.json):")
        for item in skipped:
            log(f"  {item['key']}: {item['error']}")
