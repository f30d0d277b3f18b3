"""Numpy resizes with exactly PyTorch's semantics, used to resize examples once at conversion time.

The authors' loader resizes with torchvision `Resize` on tensors (torchvision 0.14): bilinear interpolation with
`align_corners=False` and no antialiasing for images, depth, normals and edges, and PyTorch's legacy nearest rule
`src = floor(dst * in / out)` for label maps. `jax.image.resize` antialiases when downscaling and rounds nearest
indices differently, so the index maps are explicit; they are the ones the losses use (`mtl_sparse_jax/data/resize.py`).
"""

from __future__ import annotations

import numpy as np

from mtl_sparse_jax.data.resize import bilinear_source_weights, nearest_source_indices


def _bilinear_taps(in_size: int, out_size: int):
    """(i0, i1, w0, w1) along one axis, from the shared index map (`mtl_sparse_jax.data.resize`)."""
    i0, i1, w1 = bilinear_source_weights(in_size, out_size)
    return i0, i1, 1.0 - w1, w1


nearest_indices = nearest_source_indices


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize [H, W] or [H, W, C] to [height, width(, C)] bilinearly, half-pixel centres, no antialias.

    Returns float32, computed in float32 as PyTorch does for float32 tensors. Integer input (e.g. a uint8 image)
    is resized as float; round it yourself if needed. Zeros are interpolated like any other value, as in the
    reference (e.g. invalid depth blends with its neighbours).
    """
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"resize_bilinear expects [H,W] or [H,W,C], got shape {array.shape}")
    in_h, in_w = array.shape[:2]
    if (in_h, in_w) == (height, width):
        return array.astype(np.float32)
    r0, r1, rw0, rw1 = _bilinear_taps(in_h, height)
    c0, c1, cw0, cw1 = _bilinear_taps(in_w, width)
    extra = (1,) * (array.ndim - 2)
    # Rows first, gathering in the input dtype: the float work is then on height×in_w, not in_h×in_w, pixels.
    rows = array[r0].astype(np.float32) * rw0.astype(np.float32).reshape((-1, 1) + extra)
    rows += array[r1].astype(np.float32) * rw1.astype(np.float32).reshape((-1, 1) + extra)
    out = rows[:, c0] * cw0.astype(np.float32).reshape((1, -1) + extra)
    out += rows[:, c1] * cw1.astype(np.float32).reshape((1, -1) + extra)
    return out


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a label map [H, W] (or [H, W, C]) with PyTorch's legacy nearest rule; keeps the dtype."""
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"resize_nearest expects [H,W] or [H,W,C], got shape {array.shape}")
    rows = nearest_indices(array.shape[0], height)
    cols = nearest_indices(array.shape[1], width)
    return array[rows][:, cols]


def resize_image_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 RGB image, rounded back to uint8 for PNG storage.

    The reference resizes the float image in [0, 1]; storing uint8 adds at most 0.5/255 of rounding error.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"resize_image_uint8 expects uint8, got {image.dtype}")
    if image.shape[:2] == (height, width):
        return image
    out = resize_bilinear(image, height, width)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
