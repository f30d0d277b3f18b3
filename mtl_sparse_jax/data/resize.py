"""PyTorch's resize index maps (the one definition, which `data_prep` shares) and jittable NHWC resizes.

The reference resizes targets and predictions with `torch.nn.functional.interpolate` / torchvision `Resize`
(tensor path, no antialias). `jax.image.resize` antialiases when downsampling and uses a different nearest
rule, so matching the reference needs explicit index maps:

* `resize_nearest_torch`: PyTorch's legacy ``'nearest'`` mode, ``src = min(floor(dst * (in / out)), in - 1)``
  with the scale computed in float32 as PyTorch does. For a 256 -> 32 downsample this picks pixel (8i, 8j).
* `resize_bilinear_torch`: ``'bilinear'`` with ``align_corners=False`` (half-pixel centres), source index
  ``(dst + 0.5) * (in / out) - 0.5`` clamped at 0, upper neighbour clamped at ``in - 1``, no antialias.
  For a 256 -> 32 downsample this is the mean of the central 2x2 pixels of each 8x8 block.

Both accept ``[B, H, W]`` or ``[B, H, W, C]`` arrays (spatial axes 1 and 2). Index maps and weights are
computed on the host from static shapes, so the resize itself is two gathers (and, for bilinear, two
weighted sums) per call; no matmul is involved, hence no reduced-precision (TF32) rounding on GPUs.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["resize_nearest_torch", "resize_bilinear_torch", "nearest_source_indices", "bilinear_source_weights"]


def _check_size(x, size: Sequence[int], fn_name: str) -> tuple[int, int]:
    if x.ndim not in (3, 4):
        raise ValueError(f"{fn_name}: expected an array of shape [B,H,W] or [B,H,W,C], got shape {tuple(x.shape)}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"{fn_name}: size must be (height, width) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


def nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index for PyTorch's legacy nearest mode: min(floor(dst * in/out), in - 1).

    PyTorch evaluates the scale and the product in float32 (and maps equal sizes to the identity); doing the same
    keeps the rare ties identical (checked against torch 2.13's `interpolate` for all sizes up to 80 → 70).
    """
    if in_size == out_size:
        return np.arange(out_size, dtype=np.int64)
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.floor(dst * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def bilinear_source_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, float64 weight of the upper index) for align_corners=False bilinear.

    PyTorch's rule: src = (dst + 0.5)·in/out − 0.5 clamped below at 0, lower = floor(src) (at most in − 1),
    upper = min(lower + 1, in − 1), weights (1 − frac, frac). Computed in float64; for the resizes this project
    makes (480×640 → 256², 256 ↔ 32, 64 ↔ 8) the result equals torch's float32 `interpolate` to 1 ulp.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, src - lower


def resize_nearest_torch(x, size: Sequence[int]):
    """Nearest resize of the spatial axes (1, 2) to ``size`` = (h, w); keeps dtype (works for int labels)."""
    out_h, out_w = _check_size(x, size, "resize_nearest_torch")
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    x = jnp.take(x, jnp.asarray(nearest_source_indices(in_h, out_h)), axis=1)
    return jnp.take(x, jnp.asarray(nearest_source_indices(in_w, out_w)), axis=2)


def _bilinear_axis(x, axis: int, out_size: int):
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    lower, upper, upper_weight = bilinear_source_weights(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = jnp.asarray(upper_weight, dtype=x.dtype).reshape(shape)
    x_lower = jnp.take(x, jnp.asarray(lower), axis=axis)
    x_upper = jnp.take(x, jnp.asarray(upper), axis=axis)
    return x_lower * (1 - w) + x_upper * w


def resize_bilinear_torch(x, size: Sequence[int]):
    """Bilinear resize (align_corners=False, no antialias) of the spatial axes (1, 2) to ``size`` = (h, w).

    Integer inputs are computed in float32; floating inputs keep their dtype.
    """
    out_h, out_w = _check_size(x, size, "resize_bilinear_torch")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    # Separable: PyTorch's 2-D bilinear equals a row pass followed by a column pass.
    return _bilinear_axis(_bilinear_axis(x, 1, out_h), 2, out_w)
