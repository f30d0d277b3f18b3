"""Plain numpy references that the model tests check JAX against."""

import numpy as np


def np_conv(x, w, stride=1, dilation=1):
    """Zero-padded ('same') cross-correlation in numpy, NHWC × HWIO."""
    k = w.shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    wo = (x.shape[2] + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for a in range(k):
        for c in range(k):
            patch = xp[:, a * dilation :, c * dilation :][
                :, : stride * (ho - 1) + 1 : stride, : stride * (wo - 1) + 1 : stride
            ]
            out += patch @ w[a, c]
    return out
