"""Layers and heads against plain numpy: conv padding/stride/dilation, PyTorch BatchNorm semantics, −inf max-pool
padding, PyTorch default init statistics, and the DeepLab and classification heads in eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax.models import (
    BatchNorm,
    ClassificationHead,
    Conv2d,
    DeepLabHead,
    Dense,
    HeadSpec,
    MultiTaskModel,
    max_pool_3x3_s2,
)

# Threefry init compiles slowly on a 2-core CPU; the 'rbg' generator gives the same distributions.
KEY = jax.random.key(0, impl="rbg")


def np_conv(x, w, stride=1, dilation=1, bias=None):
    """Cross-correlation NHWC × HWIO with zero padding dilation·(k−1)/2, by explicit index arithmetic."""
    k = w.shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    b, h, wd, _ = x.shape
    ho = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    wo = (wd + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out = np.zeros((b, ho, wo, w.shape[3]))
    for i in range(ho):
        for j in range(wo):
            for a in range(k):
                for c in range(k):
                    out[:, i, j, :] += xp[:, i * stride + a * dilation, j * stride + c * dilation, :] @ w[a, c]
    if bias is not None:
        out += bias
    return out


def np_bn_eval(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def randomize(variables, seed):
    """Replace every leaf with random values of its shape (variances positive), so BN stats are non-trivial."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, variables)


@pytest.mark.parametrize(
    "size,k,stride,dilation",
    [(7, 3, 1, 1), (8, 3, 2, 1), (7, 3, 2, 1), (9, 3, 1, 2), (9, 3, 2, 3), (6, 1, 2, 1), (5, 3, 1, 12)],
)
def test_conv_matches_numpy_padding_stride_dilation(size, k, stride, dilation):
    rng = np.random.default_rng(size * 100 + k * 10 + dilation)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    w = rng.normal(size=(k, k, 3, 4)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    conv = Conv2d(4, k, stride, dilation, use_bias=True)
    y = conv.apply({"params": {"kernel": w, "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(y), np_conv(x, w, stride, dilation, bias), rtol=1e-5, atol=1e-5)


def test_conv_with_dilation_beyond_the_map_is_its_centre_tap():
    # With zero padding = dilation ≥ map size, every off-centre tap reads padding (the rate-36 ASPP branch at 32×32).
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 5, 5, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    y = Conv2d(2, 3, 1, 6).apply({"params": {"kernel": w}}, x)
    np.testing.assert_allclose(np.asarray(y), x @ w[1, 1], rtol=1e-5, atol=1e-5)


def test_batchnorm_train_normalises_with_biased_var_and_stores_unbiased_var():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(4, 3, 5, 6)).astype(np.float32)
    params = {"scale": rng.normal(size=6).astype(np.float32), "bias": rng.normal(size=6).astype(np.float32)}
    stats = {"mean": rng.normal(size=6).astype(np.float32), "var": rng.uniform(0.5, 2, 6).astype(np.float32)}
    y, new = BatchNorm().apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])

    flat = x.reshape(-1, 6).astype(np.float64)
    mean, var_biased, var_unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
    expected = (x - mean) / np.sqrt(var_biased + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["batch_stats"]["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 * stats["var"] + 0.1 * var_unbiased, rtol=1e-5)


def test_batchnorm_eval_uses_running_stats_and_leaves_them_unchanged():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    params = {"scale": rng.normal(size=5).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
    stats = {"mean": rng.normal(size=5).astype(np.float32), "var": rng.uniform(0.5, 2, 5).astype(np.float32)}
    y, new = BatchNorm().apply({"params": params, "batch_stats": stats}, x, train=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), np_bn_eval(x, params, stats), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new["batch_stats"]["mean"], stats["mean"])
    np.testing.assert_array_equal(new["batch_stats"]["var"], stats["var"])


def test_batchnorm_init_is_identity_params_and_unit_stats_even_in_train_mode():
    x = jnp.asarray(np.random.default_rng(4).normal(5.0, 3.0, size=(4, 2, 2, 3)), jnp.float32)
    v = BatchNorm().init(KEY, x, train=True)
    np.testing.assert_array_equal(v["params"]["scale"], np.ones(3))
    np.testing.assert_array_equal(v["params"]["bias"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))


def test_batchnorm_num_updates_equals_repeated_updates_with_the_same_batch():
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, size=(3, 4, 4, 2)).astype(np.float32)
    v = {
        "params": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)},
        "batch_stats": {"mean": rng.normal(size=2).astype(np.float32), "var": np.full(2, 1.5, np.float32)},
    }
    repeated = v
    for _ in range(3):
        _, upd = BatchNorm().apply(repeated, x, train=True, mutable=["batch_stats"])
        repeated = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    _, once = BatchNorm(num_updates=3).apply(v, x, train=True, mutable=["batch_stats"])
    for k in ("mean", "var"):
        np.testing.assert_allclose(once["batch_stats"][k], repeated["batch_stats"][k], rtol=1e-5, atol=1e-6)


def test_max_pool_pads_with_minus_infinity():
    rng = np.random.default_rng(6)
    x = -rng.uniform(1.0, 2.0, size=(1, 6, 6, 2)).astype(np.float32)  # all negative: zero padding would win
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    expected = np.stack(
        [
            np.stack([xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2)) for j in range(3)], 1)
            for i in range(3)
        ],
        1,
    )
    np.testing.assert_array_equal(np.asarray(max_pool_3x3_s2(x)), expected)


def _check_uniform_fan_in(a, fan_in, check_variance):
    a = np.asarray(a, np.float64).ravel()
    bound = 1.0 / np.sqrt(fan_in)
    assert np.abs(a).max() <= bound * (1 + 1e-6)
    if check_variance:
        # Var(U(±b)) = b²/3; the sample variance of n draws has relative standard error ≈ 0.894/√n.
        rel_se = 0.894 / np.sqrt(a.size)
        assert abs(a.var() / (bound**2 / 3) - 1) < 6 * rel_se
        assert abs(a.mean()) < 6 * bound / np.sqrt(3 * a.size)
        assert np.abs(a).max() > 0.95 * bound


def test_conv_and_dense_init_is_pytorch_uniform_fan_in():
    x = jnp.zeros((1, 4, 4, 128))
    v = Conv2d(128, 3, use_bias=True).init(KEY, x)["params"]
    _check_uniform_fan_in(v["kernel"], 3 * 3 * 128, check_variance=True)
    _check_uniform_fan_in(v["bias"], 3 * 3 * 128, check_variance=False)
    d = Dense(256).init(KEY, jnp.zeros((1, 512)))["params"]
    _check_uniform_fan_in(d["kernel"], 512, check_variance=True)
    _check_uniform_fan_in(d["bias"], 512, check_variance=False)


def test_whole_model_init_bounds_every_weight_and_bias_by_its_fan_in():
    model = MultiTaskModel(
        [HeadSpec("seg", "deeplab", 3), HeadSpec("smile", "classification", 1)],
        depth=18,
        width_multiplier=1 / 8,
        head_width_multiplier=1 / 8,
    )
    v = jax.jit(lambda x: model.init(KEY, x, train=False))(jnp.zeros((2, 32, 32, 3)))
    seen = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(v["params"]):
        keys = [p.key for p in path]
        parent = v["params"]
        for k in keys[:-1]:
            parent = parent[k]
        if keys[-1] == "kernel" or (keys[-1] == "bias" and "kernel" in parent):
            kernel = parent["kernel"]
            fan_in = int(np.prod(kernel.shape[:-1]))
            _check_uniform_fan_in(leaf, fan_in, check_variance=leaf.size >= 2000)
            seen += 1
        elif keys[-1] == "scale":
            np.testing.assert_array_equal(leaf, np.ones(leaf.shape))
        else:  # BN bias
            np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))
    assert seen > 20
    for path, leaf in jax.tree_util.tree_leaves_with_path(v["batch_stats"]):
        expected = 1.0 if path[-1].key == "var" else 0.0
        np.testing.assert_array_equal(leaf, np.full(leaf.shape, expected))


def _np_deeplab_eval(x, v, rates):
    p, s = v["params"], v["batch_stats"]

    def cbr(y, name, dilation):
        return np.maximum(
            np_bn_eval(np_conv(y, p[f"{name}_conv"]["kernel"], 1, dilation), p[f"{name}_bn"], s[f"{name}_bn"]), 0
        )

    branches = [cbr(x, "aspp_conv1x1", 1)] + [cbr(x, f"aspp_rate{r}", r) for r in rates]
    pooled = cbr(x.mean(axis=(1, 2), keepdims=True), "aspp_pool", 1)
    branches.append(np.broadcast_to(pooled, x.shape[:3] + (pooled.shape[-1],)))
    y = cbr(np.concatenate(branches, -1), "aspp_project", 1)
    y = cbr(y, "head", 1)
    return np_conv(y, p["classifier"]["kernel"], bias=p["classifier"]["bias"])


@pytest.mark.parametrize("rates", [(1, 2, 3), (12, 24, 36)])
def test_deeplab_head_eval_matches_numpy(rates):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 7, 6, 5)).astype(np.float32)
    head = DeepLabHead(out_channels=3, rates=rates, channels=4)
    shapes = jax.eval_shape(lambda x: head.init(KEY, x, train=False), x)
    v = randomize(shapes, seed=8)
    y = jax.jit(lambda v, x: head.apply(v, x, train=False))(v, x)
    assert y.shape == (2, 7, 6, 3)
    np.testing.assert_allclose(np.asarray(y), _np_deeplab_eval(x, v, rates), rtol=2e-4, atol=2e-4)


def test_classification_head_eval_matches_numpy_and_returns_one_logit_per_image():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 5, 5, 6)).astype(np.float32)  # odd size: the 2×2 pool floors to 2×2
    head = ClassificationHead(hidden=4, dense=3)
    v = randomize(jax.eval_shape(lambda x: head.init(KEY, x, train=False), x), seed=10)
    y = jax.jit(lambda v, x: head.apply(v, x, train=False))(v, x)
    p = v["params"]
    h = np.maximum(np_conv(x, p["conv"]["kernel"], bias=p["conv"]["bias"]), 0)
    h = h[:, :4, :4].reshape(3, 2, 2, 2, 2, 4).max(axis=(2, 4))
    h = h.mean(axis=(1, 2))
    h = np.maximum(h @ p["dense1"]["kernel"] + p["dense1"]["bias"], 0)
    logit = (h @ p["dense2"]["kernel"] + p["dense2"]["bias"])[:, 0]
    assert y.shape == (3,)
    np.testing.assert_allclose(np.asarray(y), logit, rtol=1e-4, atol=1e-4)


def test_classification_head_rejects_maps_too_small_for_its_pool():
    with pytest.raises(ValueError, match="h,w >= 2"):
        ClassificationHead().init(KEY, jnp.zeros((1, 1, 1, 4)), train=False)
