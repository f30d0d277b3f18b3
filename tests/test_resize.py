"""PyTorch-semantics resizes against plain numpy loops written from PyTorch's documented index rules."""

import math

import jax
import numpy as np
import pytest

from mtl_sparse_jax.data.resize import resize_bilinear_torch, resize_nearest_torch


def numpy_nearest(x, out_h, out_w):
    """Legacy nearest: src = floor(dst * in / out), computed exactly in integers."""
    b, in_h, in_w = x.shape[:3]
    out = np.zeros((b, out_h, out_w) + x.shape[3:], x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            out[:, i, j] = x[:, min(i * in_h // out_h, in_h - 1), min(j * in_w // out_w, in_w - 1)]
    return out


def numpy_bilinear(x, out_h, out_w):
    """align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0); neighbours floor(src), min(floor+1, in-1)."""
    x = x.astype(np.float64)
    b, in_h, in_w = x.shape[:3]
    out = np.zeros((b, out_h, out_w) + x.shape[3:])

    def source(dst, n_in, n_out):
        s = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(s)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), s - lo

    for i in range(out_h):
        y0, y1, wy = source(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, wx = source(j, in_w, out_w)
            out[:, i, j] = (
                (1 - wy) * (1 - wx) * x[:, y0, x0]
                + (1 - wy) * wx * x[:, y0, x1]
                + wy * (1 - wx) * x[:, y1, x0]
                + wy * wx * x[:, y1, x1]
            )
    return out


# Down- and up-sampling, integer and non-integer ratios, and mixed (down in H, up in W).
SIZES = [
    ((13, 11), (5, 4)),
    ((7, 9), (3, 7)),
    ((5, 4), (13, 11)),
    ((3, 8), (8, 3)),
    ((16, 16), (2, 2)),
    ((6, 10), (9, 15)),
]


@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_nearest_matches_numpy_loops(in_size, out_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2,) + in_size + (3,)).astype(np.float32)
    got = np.asarray(resize_nearest_torch(x, out_size))
    np.testing.assert_array_equal(got, numpy_nearest(x, *out_size))


@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_bilinear_matches_numpy_loops(in_size, out_size):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2,) + in_size + (2,)).astype(np.float32)
    got = np.asarray(resize_bilinear_torch(x, out_size))
    np.testing.assert_allclose(got, numpy_bilinear(x, *out_size), rtol=1e-5, atol=1e-6)


def test_nearest_rounds_like_pytorch_in_float32():
    """PyTorch computes floor(dst * float32(in/out)) in float32; for 62 -> 224 that differs from exact arithmetic."""
    x = np.arange(62, dtype=np.int32).reshape(1, 62, 1)
    scale = np.float32(62) / np.float32(224)
    float32_rule = np.minimum(np.floor(np.arange(224, dtype=np.float32) * scale).astype(int), 61)
    exact_rule = np.minimum(np.arange(224) * 62 // 224, 61)
    assert (float32_rule != exact_rule).any()
    got = np.asarray(resize_nearest_torch(x, (224, 1)))[0, :, 0]
    np.testing.assert_array_equal(got, float32_rule)


def test_nearest_keeps_integer_labels_and_3d_arrays():
    labels = np.arange(2 * 12 * 10, dtype=np.int32).reshape(2, 12, 10) % 41
    labels[0, 0, 0] = 255
    got = resize_nearest_torch(labels, (5, 3))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(got), numpy_nearest(labels, 5, 3))


def test_stride_8_downsample_facts():
    """256 -> 32 (here 64 -> 8): nearest takes pixel (8i, 8j); bilinear is the mean of each block's central 2x2."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 64, 64, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resize_nearest_torch(x, (8, 8))), x[:, ::8, ::8])
    central = x.reshape(1, 8, 8, 8, 8, 1)[:, :, 3:5, :, 3:5].mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(resize_bilinear_torch(x, (8, 8))), central, rtol=1e-6, atol=1e-6)


def test_resizes_are_jittable():
    x = np.random.default_rng(3).normal(size=(1, 7, 5, 2)).astype(np.float32)
    got = jax.jit(lambda a: resize_bilinear_torch(a, (3, 9)))(x)
    np.testing.assert_allclose(np.asarray(got), numpy_bilinear(x, 3, 9), rtol=1e-5, atol=1e-6)


def test_bad_rank_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"\[B,H,W\] or \[B,H,W,C\]"):
        resize_nearest_torch(np.zeros((4, 4), np.float32), (2, 2))


def _plain_bilinear_taps(in_size, out_size):
    """PyTorch's align_corners=False rule, element by element in Python floats (float64)."""
    out = []
    for dst in range(out_size):
        src = max((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)  # the scale first, as PyTorch
        lo = min(int(src // 1), in_size - 1)
        out.append((lo, min(lo + 1, in_size - 1), src - lo))
    return out


def test_one_index_map_shared_with_data_prep_and_exact_against_plain_float64():
    from data_prep import resize as prep_resize
    from mtl_sparse_jax.data import resize as data_resize

    assert prep_resize.nearest_indices is data_resize.nearest_source_indices
    for in_size in (1, 2, 3, 7, 8, 32, 64, 255, 256, 480, 640):
        for out_size in (1, 5, 8, 31, 32, 64, 256, 257):
            lo, hi, w = data_resize.bilinear_source_weights(in_size, out_size)
            plain = _plain_bilinear_taps(in_size, out_size)
            assert lo.tolist() == [p[0] for p in plain] and hi.tolist() == [p[1] for p in plain]
            assert w.tolist() == [p[2] for p in plain]
            i0, i1, w0, w1 = prep_resize._bilinear_taps(in_size, out_size)
            assert i0.tolist() == lo.tolist() and i1.tolist() == hi.tolist() and w1.tolist() == w.tolist()
            assert (w0 == 1.0 - w1).all()
