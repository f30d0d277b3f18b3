"""Padding-aware convolution (models/conv.py) against the fully zero-padded ``lax.conv_general_dilated``.

Forward, input gradient and kernel gradient of every way ``conv2d`` can compute a conv ('auto', 'trimmed',
'taps') must equal the full conv to float32 rounding, over map sizes (square, non-square, smaller than the
rate), kernels 1 and 3, strides 1 and 2, rates 1 to 36 and a few channel counts; bf16 with a looser tolerance.
The tap bookkeeping is checked against a brute-force count, and the DeepLab head on the demo's 8×8 map is
checked to compute only centre taps in its dilated branches.
"""

import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax.models import DeepLabHead, conv

RATES = (1, 2, 4, 12, 24, 36)
METHODS = ("auto", "trimmed", "taps")


def full_conv(x, w, stride, dilation, pad):
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def fwd_and_grads(fn, x, w, g):
    y, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(g)
    return y, dx, dw


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g}·{scale:.3g}"


CASES = [
    # (H, W, C_in, C_out, kernel, stride)
    (8, 8, 3, 4, 3, 1),
    (8, 16, 2, 3, 3, 1),
    (5, 7, 3, 2, 3, 2),
    (8, 8, 4, 2, 3, 2),
    (1, 3, 2, 2, 3, 1),
    (32, 9, 1, 2, 3, 1),
    (6, 5, 3, 4, 1, 1),
    (7, 6, 3, 4, 1, 2),
]


def all_methods_and_reference(stride, rate, pad, dtype=None):
    """One jitted function: (forward, input grad, kernel grad) of the full conv and of every conv2d method.

    With ``dtype``, conv2d runs on inputs cast to it while the reference stays in the inputs' dtype."""

    def run(x, w, g):
        out = {"full": fwd_and_grads(lambda a, b: full_conv(a, b, stride, rate, pad), x, w, g)}
        if dtype is not None:
            x, w, g = x.astype(dtype), w.astype(dtype), g.astype(dtype)
        for method in METHODS:
            fn = lambda a, b, m=method: conv.conv2d(a, b, stride=stride, dilation=rate, padding=pad, method=m)
            out[method] = fwd_and_grads(fn, x, w, g)
        return out

    return jax.jit(run)


@pytest.mark.parametrize("h,w,cin,cout,k,stride", CASES)
def test_forward_and_gradients_equal_the_full_zero_padded_conv(h, w, cin, cout, k, stride):
    rng = np.random.default_rng(h * 1000 + w * 10 + k + stride)
    x = jnp.asarray(rng.normal(size=(2, h, w, cin)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g = jnp.asarray(rng.normal(size=(2, ho, wo, cout)), jnp.float32)
    for rate in RATES if k > 1 else (1,):
        pad = rate * (k - 1) // 2
        out = all_methods_and_reference(stride, rate, pad)(x, kern, g)
        for method in METHODS:
            for name, a, e in zip(("forward", "input grad", "kernel grad"), out[method], out["full"]):
                assert_close(a, e, 1e-5, f"{method} {name} rate {rate}")


def test_bfloat16_matches_within_bf16_rounding():
    rng = np.random.default_rng(7)
    # bf16-representable float32 inputs: the float32 reference sees exactly the values conv2d sees in bf16.
    x = jnp.asarray(rng.normal(size=(2, 8, 16, 8)), jnp.bfloat16).astype(jnp.float32)
    kern = jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.bfloat16).astype(jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 8, 16, 4)), jnp.bfloat16).astype(jnp.float32)
    for rate in (2, 4, 12):
        out = all_methods_and_reference(1, rate, rate, dtype=jnp.bfloat16)(x, kern, g)
        for method in METHODS:
            for name, a, e in zip(("forward", "input grad", "kernel grad"), out[method], out["full"]):
                assert a.dtype == jnp.bfloat16, f"{method} {name} dtype {a.dtype}"
                assert_close(a, e, 2e-2, f"bf16 {method} {name} rate {rate}")


def brute_force_live_taps(size, k, stride, dilation, pad):
    """Per tap: the output positions at which it reads the map (not padding), by enumeration."""
    out = (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    return out, [[o for o in range(out) if 0 <= o * stride + t * dilation - pad < size] for t in range(k)]


def test_axis_plan_matches_brute_force_enumeration():
    for size, k, stride, dilation in itertools.product((1, 2, 5, 8, 13, 32), (1, 3, 5), (1, 2, 3), RATES):
        pad = dilation * (k - 1) // 2
        out, valid = brute_force_live_taps(size, k, stride, dilation, pad)
        plan = conv.axis_plan(size, k, stride, dilation, (pad, pad))
        assert plan.out_size == out
        expected = tuple((t, v[0], v[-1]) for t, v in enumerate(valid) if v)
        assert plan.live == expected, (size, k, stride, dilation)
        for _, lo, hi in plan.live:  # valid positions are contiguous, so (first, last) describes them
            assert len(valid[_]) == hi - lo + 1


def test_taps_beyond_the_map_are_dropped_rows_and_columns_separately():
    # 3×3 rate 12 on 8×16: every off-centre row tap reads padding (12 ≥ 8), the column taps ±12 reach the map.
    method, rows, cols = conv.choose_method((1, 8, 16, 1), (3, 3, 1, 1), 1, 12, 12)
    assert [t for t, _, _ in rows.live] == [1] and rows.pad == (0, 0)
    assert [(t, lo, hi) for t, lo, hi in cols.live] == [(0, 12, 15), (1, 0, 15), (2, 0, 3)]
    # Every rate ≥ the map size reduces a 3×3 to its centre tap, a 1×1 conv without padding.
    for rate in (8, 12, 24, 36):
        method, rows, cols = conv.choose_method((1, 8, 8, 1), (3, 3, 1, 1), 1, rate, rate)
        assert (method, rows.live, cols.live, rows.pad, cols.pad) == (
            "trimmed",
            ((1, 0, 7),),
            ((1, 0, 7),),
            (0, 0),
            (0, 0),
        )


def test_dropped_taps_get_an_exact_zero_kernel_gradient_as_in_the_full_conv():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 16, 3)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 8, 16, 2)), jnp.float32)
    _, _, dw = fwd_and_grads(lambda a, b: conv.conv2d(a, b, dilation=12, padding=12), x, kern, g)
    _, _, dw_full = fwd_and_grads(lambda a, b: full_conv(a, b, 1, 12, 12), x, kern, g)
    dw, dw_full = np.asarray(dw), np.asarray(dw_full)
    assert np.all(dw[0] == 0) and np.all(dw[2] == 0)  # rows ±12 never touch an 8-row map
    assert np.all(dw_full[0] == 0) and np.all(dw_full[2] == 0)
    assert np.all(dw[1] != 0)


def conv_taps_computed(jaxpr) -> int:
    """Sum over the jaxpr's conv and dot equations of (kernel taps × output positions × C_in × C_out)."""
    total = 0
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += conv_taps_computed(sub)
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            total += int(np.prod(out)) * rhs[0] * rhs[1] * rhs[2]
        elif eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            total += int(np.prod(out)) * rhs[0]
    return total


def test_deeplab_head_on_the_demo_map_computes_only_centre_taps_of_its_dilated_branches():
    x = jnp.zeros((2, 8, 8, 16), jnp.float32)
    head = DeepLabHead(3, channels=4)
    variables = head.init(jax.random.key(0, impl="rbg"), x, train=False)

    def apply(v, a):
        return head.apply(v, a, train=False)

    counts = {}
    for enabled in (False, True):
        with conv.padding_aware(enabled):
            # A new function object each time: JAX caches traces per function, and the switch acts at trace time.
            counts[enabled] = conv_taps_computed(jax.make_jaxpr(lambda v, a: apply(v, a))(variables, x).jaxpr)
    positions, c = 2 * 8 * 8, 4
    # 1×1 branch, 3 ASPP 3×3 branches, projection (5c → c), head 3×3 (c → c), classifier (c → 3); pooled 1×1 on 1×1.
    common = positions * (16 * c + 5 * c * c + 9 * c * c + c * 3) + 2 * 16 * c
    assert counts[False] == common + 3 * positions * 9 * 16 * c
    assert counts[True] == common + 3 * positions * 1 * 16 * c
    with conv.padding_aware(False):
        y_full = jax.jit(lambda v, a: apply(v, a))(variables, x + 1.0)
    y = jax.jit(lambda v, a: apply(v, a))(variables, x + 1.0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_full), rtol=1e-5, atol=1e-5)


def test_padding_aware_switch_is_read_at_trace_time_and_restored():
    assert conv.is_padding_aware()
    with conv.padding_aware(False):
        assert not conv.is_padding_aware()
    assert conv.is_padding_aware()


def test_bad_arguments_are_refused():
    x = jnp.zeros((1, 4, 4, 2))
    w = jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="method"):
        conv.conv2d(x, w, padding=1, method="fast")
    with pytest.raises(ValueError, match="padding"):
        conv.conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="kernel"):
        conv.conv2d(x, jnp.zeros((3, 3, 3, 2)), padding=1)


def test_auto_rule_picks_per_tap_products_only_for_large_dilated_convs_with_a_low_valid_fraction():
    # Valid fraction of a 3×3 rate-r conv on an n×n map: ((n + 2(n − r)) / 3n)² for r < n.
    expected = {
        (2, 32, 2048, 256, 1): "trimmed",  # undilated: one conv whatever the fraction
        (2, 32, 512, 512, 4): "trimmed",  # fraction 0.840
        (2, 32, 2048, 256, 12): "taps",  # 0.5625, 9.7 G multiply-adds in full
        (2, 32, 2048, 256, 24): "taps",  # 0.25
        (2, 32, 2048, 256, 36): "trimmed",  # centre tap only
        (32, 8, 64, 64, 4): "trimmed",  # 0.444 but only 75 M multiply-adds in full
        (32, 8, 1024, 1024, 4): "taps",  # 0.444, 19 G
        (32, 8, 1024, 1024, 2): "trimmed",  # 0.694
    }
    for (b, n, cin, cout, rate), method in expected.items():
        got = conv.choose_method((b, n, n, cin), (3, 3, cin, cout), 1, rate, rate)[0]
        assert got == method, (b, n, cin, cout, rate)
    # Padding beyond the kernel's reach: stride 10 reads only position −4 of a 2×2 map padded by 4.
    assert conv.choose_method((1, 2, 2, 3), (1, 1, 3, 2), 10, 1, 4)[0] == "zero"
    x, w = jnp.ones((1, 2, 2, 3)), jnp.ones((1, 1, 3, 2))
    y = conv.conv2d(x, w, stride=10, padding=4)
    assert y.shape == full_conv(x, w, 10, 1, 4).shape == (1, 1, 1, 2) and not np.any(np.asarray(y))
