"""Padding-aware 2-D convolution: the same result as a zero-padded convolution, without computing on the padding.

The models pad every convolution explicitly with zeros (``dilation·(k−1)/2`` on each side, PyTorch's convention).
With the heavily dilated ASPP branches of the DeepLab heads on small feature maps, most kernel taps then read
nothing but padding: a 3×3 conv of rate 12 on an 8×8 map multiplies its eight off-centre taps by zeros at every
output position. XLA computes those products anyway (and, on the CPU, slowly). :func:`conv2d` works out from the
*static* input shape which taps can ever touch the map and computes only those:

1. **Dead taps are dropped.** Rows and columns are handled separately: a kernel row whose input row lies in the
   padding for every output row is cut off, and likewise for columns, with the padding reduced by the same
   amount so that every remaining tap reads exactly what it read before. A 3×3 rate-d conv on an H×W map with
   d ≥ H and d ≥ W becomes its centre tap, a 1×1 conv; rate 12 on an 8×16 map becomes a 1×3 conv.
2. **Taps valid on part of the map.** After step 1, let the *valid fraction* be the share of (tap, output
   position) products of the trimmed kernel that read the map rather than padding. The conv is computed as a sum
   of per-tap products when all of these hold: the trimmed kernel is dilated (rate > 1 along an axis with more
   than one live tap), the valid fraction is below :data:`TAPS_BELOW_VALID_FRACTION` (0.6), and the full conv
   is at least :data:`TAPS_MIN_FULL_MACS` (2³⁰) multiply-adds per call. Per-tap products are, for each tap, one
   matrix product of the input window the tap actually reads with that tap's ``[C_in, C_out]`` weights, added
   into the output window where the tap is valid (taps with the same output window are summed before being
   placed). Otherwise the trimmed kernel goes to ``lax.conv_general_dilated`` as one convolution.

The rule was measured on the 2-core CPU (``benchmarks/padding_conv.py --only rule``; BENCHMARKS.md, section
"padding-conv"). Fwd+bwd of the paper's ASPP at 32×32 (2048 → 256, batch 2): rate 24 (fraction 0.25) is
~4.5× faster as per-tap products, rate 12 (0.56) ~1.7×; at fractions around 0.7 and above one conv is as fast
or faster. Per-tap products take ~4–5 s longer to compile per conv than one conv, so small convs (the demo's
layer-4 rate-4 3×3 on 8×8, 75 M multiply-adds, where they save ~0.5 ms a call) stay one conv. Undilated convs
always are one conv. On a GPU the rule has not been measured.

Both ways are exact rewrites of the zero-padded convolution: the dropped products are products with zeros. So the
forward pass, the input gradient and the kernel gradient equal those of the full computation up to the order of
the floating-point additions; a dropped tap's weights get an exact zero gradient from the data, as in the full
computation. The kernel keeps its full shape (parameters, checkpoints and compaction do not change). Per-tap
products accumulate in float32 and round once to the input dtype.

:func:`padding_aware` switches the whole thing off (plain ``lax.conv_general_dilated`` with full padding), for
side-by-side benchmarks (``benchmarks/padding_conv.py``); it acts when a function is traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Per-tap products are used for a dilated trimmed kernel whose share of valid (tap, output) products is below
# this; see the module docstring and BENCHMARKS.md for the measurement behind it.
TAPS_BELOW_VALID_FRACTION = 0.6
# ... and only when the full conv is at least this many multiply-adds per call: per-tap products take ~4-5 s more
# to compile per conv on the CPU than one conv, which a small conv never earns back in a short run.
TAPS_MIN_FULL_MACS = 2**30

_ENABLED = True
_METHODS = ("auto", "full", "trimmed", "taps")


@contextlib.contextmanager
def padding_aware(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`conv2d` with ``method='auto'`` is padding-aware (True) or the plain full conv (False).

    The setting acts when a function is traced. JAX reuses traces of a function it has seen, so entering and
    leaving the block clears JAX's caches whenever the setting changes: a function jitted or traced afterwards sees
    the setting in force. Executables compiled ahead of time (``jit(f).lower(...).compile()``) keep the setting
    they were traced with. Not thread-safe; meant for benchmarks and tests.
    """
    previous = _ENABLED
    _set(bool(enabled))
    try:
        yield
    finally:
        _set(previous)


def _set(enabled: bool) -> None:
    global _ENABLED
    if enabled != _ENABLED:
        jax.clear_caches()
        _ENABLED = enabled


def is_padding_aware() -> bool:
    """Whether :func:`conv2d` with ``method='auto'`` currently skips padding (see :func:`padding_aware`)."""
    return _ENABLED


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """Which taps along one spatial axis ever read the input, and where.

    Attributes:
      out_size: output length along the axis.
      live: for each live tap, ``(tap, first_output, last_output)`` (inclusive), in tap order; the live taps are
        contiguous.
      pad: ``(low, high)`` zero padding of the kernel cut down to the live taps.
    """

    out_size: int
    live: tuple[tuple[int, int, int], ...]
    pad: tuple[int, int]

    @property
    def empty(self) -> bool:
        """No tap ever reads the map (padding wider than the kernel's reach): the conv is zero."""
        return not self.live

    @property
    def first(self) -> int:
        return self.live[0][0]

    @property
    def last(self) -> int:
        return self.live[-1][0]

    def valid_products(self) -> int:
        """Number of (live tap, output position) pairs whose input lies inside the map."""
        return sum(hi - lo + 1 for _, lo, hi in self.live)


def axis_plan(size: int, k: int, stride: int, dilation: int, pad: tuple[int, int]) -> AxisPlan:
    """The :class:`AxisPlan` of a conv of ``k`` taps along an axis of ``size`` with the given stride/dilation/pad.

    Output ``o`` reads input ``o·stride + t·dilation − pad_low`` with tap ``t``; that is inside the map for a
    contiguous range of ``o`` (possibly empty, then the tap is dead).
    """
    lo_pad, hi_pad = pad
    out = (size + lo_pad + hi_pad - dilation * (k - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(f"conv2d: empty output for size {size}, kernel {k}, dilation {dilation}, padding {pad}")
    live = []
    for t in range(k):
        delta = t * dilation - lo_pad
        first = max(0, -(delta // stride))  # ceil(−delta / stride)
        last = min(out - 1, (size - 1 - delta) // stride)
        if first <= last:
            live.append((t, first, last))
    if not live:
        return AxisPlan(out, (), (lo_pad, hi_pad))
    first_tap, last_tap = live[0][0], live[-1][0]
    new_pad = (lo_pad - first_tap * dilation, hi_pad - (k - 1 - last_tap) * dilation)
    return AxisPlan(out, tuple(live), new_pad)


def _hw(value, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"conv2d: {name} must be a positive int or a pair (h, w) of them, got {value!r}")


def _pairs(padding, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, (int, np.integer)):
        return (int(padding), int(padding)), (int(padding), int(padding))
    if isinstance(padding, Sequence) and len(padding) == 2:
        out = []
        for p in padding:
            if isinstance(p, (int, np.integer)):
                out.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2:
                out.append((int(p[0]), int(p[1])))
            else:
                raise ValueError(f"conv2d: {name} must be an int, (h, w) or ((lo, hi), (lo, hi)), got {padding!r}")
        return out[0], out[1]
    raise ValueError(f"conv2d: {name} must be an int, (h, w) or ((lo, hi), (lo, hi)), got {padding!r}")


def _full_conv(x, kernel, stride, dilation, pads):
    """``lax.conv_general_dilated``; negative padding (a crop) is applied to the input first."""
    if any(p < 0 for pair in pads for p in pair):
        crop = [(0, 0, 0)] + [(min(lo, 0), min(hi, 0), 0) for lo, hi in pads] + [(0, 0, 0)]
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), crop)
        pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in pads)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _tap_products(x, kernel, stride, dilation, pads, rows: AxisPlan, cols: AxisPlan):
    """Sum over live taps of (input window the tap reads) @ kernel[tap], each added where the tap is valid."""
    batch = x.shape[0]
    out_dtype = x.dtype
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    groups: dict[tuple[int, int, int, int], jax.Array] = {}
    for ti, r0, r1 in rows.live:
        for tj, c0, c1 in cols.live:
            if r0 > r1 or c0 > c1:
                continue
            n, m = r1 - r0 + 1, c1 - c0 + 1
            start_r = r0 * stride[0] + ti * dilation[0] - pads[0][0]
            start_c = c0 * stride[1] + tj * dilation[1] - pads[1][0]
            window = jax.lax.slice(
                x,
                (0, start_r, start_c, 0),
                (batch, start_r + (n - 1) * stride[0] + 1, start_c + (m - 1) * stride[1] + 1, x.shape[3]),
                (1, stride[0], stride[1], 1),
            )
            prod = jax.lax.dot_general(
                window, kernel[ti, tj], (((3,), (0,)), ((), ())), preferred_element_type=acc_dtype
            )
            key = (r0, r1, c0, c1)
            groups[key] = prod if key not in groups else groups[key] + prod
    out = None
    for (r0, r1, c0, c1), prod in groups.items():
        placed = jax.lax.pad(
            prod,
            jnp.zeros((), acc_dtype),
            ((0, 0, 0), (r0, rows.out_size - 1 - r1, 0), (c0, cols.out_size - 1 - c1, 0), (0, 0, 0)),
        )
        out = placed if out is None else out + placed
    return out.astype(out_dtype)


def choose_method(
    x_shape: Sequence[int], kernel_shape: Sequence[int], stride, dilation, padding
) -> tuple[str, AxisPlan, AxisPlan]:
    """How ``method='auto'`` computes a conv of these static shapes (x NHWC, kernel HWIO): ``'trimmed'``,
    ``'taps'`` (see the module docstring) or ``'zero'`` (no tap ever reads the map).

    Returns the method and the row and column :class:`AxisPlan`.
    """
    stride = _hw(stride, "stride")
    dilation = _hw(dilation, "dilation")
    pads = _pairs(padding, "padding")
    rows = axis_plan(x_shape[1], kernel_shape[0], stride[0], dilation[0], pads[0])
    cols = axis_plan(x_shape[2], kernel_shape[1], stride[1], dilation[1], pads[1])
    if rows.empty or cols.empty:
        return "zero", rows, cols
    n_taps = len(rows.live) * len(cols.live)
    dilated = (len(rows.live) > 1 and dilation[0] > 1) or (len(cols.live) > 1 and dilation[1] > 1)
    if n_taps == 1 or not dilated:
        return "trimmed", rows, cols
    fraction = valid_fraction(rows, cols)
    full_macs = x_shape[0] * rows.out_size * cols.out_size * kernel_shape[0] * kernel_shape[1]
    full_macs *= kernel_shape[2] * kernel_shape[3]
    taps = fraction < TAPS_BELOW_VALID_FRACTION and full_macs >= TAPS_MIN_FULL_MACS
    return ("taps" if taps else "trimmed"), rows, cols


def valid_fraction(rows: AxisPlan, cols: AxisPlan) -> float:
    """Share of the (live tap, output position) products of the trimmed kernel that read the map."""
    n_taps = len(rows.live) * len(cols.live)
    return rows.valid_products() * cols.valid_products() / (n_taps * rows.out_size * cols.out_size)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride=1, dilation=1, padding=0, method: str = "auto") -> jax.Array:
    """Zero-padded 2-D cross-correlation, NHWC input × HWIO kernel → NHWC, computing only taps that read the map.

    Args:
      x: [B, H, W, C_in].
      kernel: [kh, kw, C_in, C_out], same dtype as ``x``.
      stride: int or (sh, sw).
      dilation: int or (dh, dw), the kernel (rhs) dilation.
      padding: zero padding: int, (ph, pw), or ((low_h, high_h), (low_w, high_w)); non-negative.
      method: ``'auto'`` (the rule of the module docstring; the plain full conv inside ``padding_aware(False)``),
        ``'full'`` (``lax.conv_general_dilated`` on the whole kernel and padding), ``'trimmed'`` (dead taps dropped,
        one conv) or ``'taps'`` (dead taps dropped, per-tap products on the valid windows).

    Returns:
      The same values as ``lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation)`` up to
      the order of additions, with the same output shape and dtype.
    """
    if method not in _METHODS:
        raise ValueError(f"conv2d: method must be one of {_METHODS}, got {method!r}")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
        raise ValueError(f"conv2d: expects x [B,H,W,C] and kernel [kh,kw,C,O], got {x.shape} and {kernel.shape}")
    strides = _hw(stride, "stride")
    dilations = _hw(dilation, "dilation")
    if min(strides + dilations) < 1:
        raise ValueError(f"conv2d: stride and dilation must be >= 1, got {stride!r} and {dilation!r}")
    pads = _pairs(padding, "padding")
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"conv2d: padding must be non-negative, got {padding!r}")
    if method == "auto" and not _ENABLED:
        method = "full"
    if method == "full":
        return _full_conv(x, kernel, strides, dilations, pads)
    chosen, rows, cols = choose_method(x.shape, kernel.shape, strides, dilations, pads)
    if chosen == "zero":
        shape = (x.shape[0], rows.out_size, cols.out_size, kernel.shape[3])
        return jnp.zeros(shape, jnp.result_type(x.dtype, kernel.dtype))
    if method == "auto":
        method = chosen
    if method == "taps":
        return _tap_products(x, kernel, strides, dilations, pads, rows, cols)
    trimmed = kernel[rows.first : rows.last + 1, cols.first : cols.last + 1]
    return _full_conv(x, trimmed, strides, dilations, (rows.pad, cols.pad))
