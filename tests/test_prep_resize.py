"""data_prep.resize against a direct per-pixel loop of PyTorch's interpolation formulas."""

import math

import numpy as np
import pytest

from data_prep.resize import nearest_indices, resize_bilinear, resize_image_uint8, resize_nearest


def torch_bilinear_loop(x, out_h, out_w):
    """upsample_bilinear2d, align_corners=False, written pixel by pixel as in PyTorch's CPU kernel."""
    in_h, in_w = x.shape[:2]
    out = np.zeros((out_h, out_w) + x.shape[2:], np.float64)
    rh, rw = in_h / out_h, in_w / out_w
    for oy in range(out_h):
        h1r = max(rh * (oy + 0.5) - 0.5, 0.0)
        h1 = int(h1r)
        h1p = 1 if h1 < in_h - 1 else 0
        h1l = h1r - h1
        h0l = 1.0 - h1l
        for ox in range(out_w):
            w1r = max(rw * (ox + 0.5) - 0.5, 0.0)
            w1 = int(w1r)
            w1p = 1 if w1 < in_w - 1 else 0
            w1l = w1r - w1
            w0l = 1.0 - w1l
            out[oy, ox] = h0l * (w0l * x[h1, w1] + w1l * x[h1, w1 + w1p]) + h1l * (
                w0l * x[h1 + h1p, w1] + w1l * x[h1 + h1p, w1 + w1p]
            )
    return out


def torch_nearest_loop(x, out_h, out_w):
    """Legacy 'nearest': src = min(floor(dst * in / out), in - 1)."""
    in_h, in_w = x.shape[:2]
    out = np.zeros((out_h, out_w) + x.shape[2:], x.dtype)
    for oy in range(out_h):
        sy = min(int(math.floor(oy * (in_h / out_h))), in_h - 1)
        for ox in range(out_w):
            sx = min(int(math.floor(ox * (in_w / out_w))), in_w - 1)
            out[oy, ox] = x[sy, sx]
    return out


SIZES = [((12, 16), (8, 8)), ((7, 5), (16, 11)), ((30, 40), (16, 16)), ((9, 9), (9, 9)), ((1, 6), (3, 2))]


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_bilinear_matches_pytorch_loop(in_hw, out_hw):
    rng = np.random.default_rng(0)
    for shape in (in_hw, in_hw + (3,)):
        x = rng.normal(size=shape).astype(np.float32)
        got = resize_bilinear(x, *out_hw)
        assert got.dtype == np.float32 and got.shape == out_hw + shape[2:]
        # equal up to float32 rounding (PyTorch also computes in float32)
        np.testing.assert_allclose(got, torch_bilinear_loop(x.astype(np.float64), *out_hw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_nearest_matches_pytorch_loop(in_hw, out_hw):
    x = np.random.default_rng(1).integers(0, 256, size=in_hw).astype(np.uint8)
    got = resize_nearest(x, *out_hw)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, torch_nearest_loop(x, *out_hw))


def test_nearest_never_invents_labels_and_downscale_by_two_takes_even_pixels():
    x = np.arange(64, dtype=np.uint8).reshape(8, 8)
    got = resize_nearest(x, 4, 4)
    np.testing.assert_array_equal(got, x[::2, ::2])
    np.testing.assert_array_equal(nearest_indices(480, 256)[:4], [0, 1, 3, 5])  # floor(k * 1.875)


def test_bilinear_has_no_antialias_on_integer_downscale():
    # A 2× downscale with half-pixel centres samples exactly between two source pixels: the average of a 2×2
    # block, never a wider (antialiased) kernel. A checkerboard therefore averages to exactly 0.5 everywhere.
    x = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)
    np.testing.assert_allclose(resize_bilinear(x, 4, 4), 0.5, atol=1e-7)
    # A 4× downscale averages only the two middle pixels of each 4-block: a stripe pattern 1,0,0,1 gives 0.
    stripes = np.tile(np.array([1, 0, 0, 1], np.float32), (4, 2))
    np.testing.assert_allclose(resize_bilinear(stripes, 4, 2), 0.0, atol=1e-7)


def test_uint8_image_resize_rounds_the_float_resize():
    x = np.random.default_rng(2).integers(0, 256, size=(10, 14, 3)).astype(np.uint8)
    got = resize_image_uint8(x, 6, 6)
    expected = np.clip(np.floor(torch_bilinear_loop(x.astype(np.float64), 6, 6) + 0.5), 0, 255)
    assert got.dtype == np.uint8
    # Rounding of exact .5 ties may differ (banker's vs half-up); values never differ by more than 1.
    assert np.max(np.abs(got.astype(int) - expected.astype(int))) <= 1
    assert np.mean(got == expected) > 0.95
