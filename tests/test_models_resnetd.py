"""ResNet-D backbone: the paper's counts and shapes, output strides and dilations, forward-order conv names,
width multiplier, and taps checked against a numpy recomputation from other taps and the params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import np_conv

from mtl_sparse_jax.models import Conv2d, ResNetD, conv_paths, resnetd18, resnetd101, tap_names

KEY = jax.random.key(0, impl="rbg")


def abstract_variables(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)


def conv_kernels(params):
    return {
        "/".join(p.key for p in path[:-1]): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel" and leaf.ndim == 4
    }


def record_convs(model, variables, shape, **kwargs):
    """(module path, stride, dilation, input shape, output shape) of every Conv2d call, in call order."""
    calls = []

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if isinstance(context.module, Conv2d) and context.method_name == "__call__":
            m = context.module
            calls.append(("/".join(m.scope.path), m.kernel_size, m.stride, m.dilation, args[0].shape, out.shape))
        return out

    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False, **kwargs), variables, x)
    return calls


def test_resnetd50_counts_and_output_shape_match_the_paper():
    model = ResNetD(depth=50)
    v = abstract_variables(model, (2, 256, 256, 3))
    kernels = conv_kernels(v["params"])
    assert len(kernels) == 55
    assert sum(int(np.prod(k.shape)) for k in kernels.values()) == 23_578_304
    assert sum(k.shape[2] for k in kernels.values()) == 22_787  # input-channel groups (axis 2 of HWIO)
    assert sum(k.shape[3] for k in kernels.values()) == 26_752  # output filters
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), v, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    )
    assert out.shape == (2, 32, 32, 2048)
    # The backbone has no biases: every param is a conv kernel or a BN scale/bias.
    leaves = jax.tree_util.tree_leaves_with_path(v["params"])
    assert all(p[-1].key == "kernel" or p[-2].key.startswith(("stem_bn", "bn", "downsample_bn")) for p, _ in leaves)


@pytest.mark.parametrize("depth,n_convs,channels", [(18, 3 + 8 * 2 + 4, 512), (101, 3 + 33 * 3 + 4, 2048)])
def test_other_depths_have_their_block_counts_and_widths(depth, n_convs, channels):
    model = {18: resnetd18, 101: resnetd101}[depth]()
    v = abstract_variables(model, (1, 64, 64, 3))
    assert len(conv_kernels(v["params"])) == n_convs
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), v, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    )
    assert out.shape == (1, 8, 8, channels)


@pytest.mark.parametrize("depth", [18, 50])
def test_conv_paths_are_the_kernels_in_forward_call_order(depth):
    model = ResNetD(depth=depth, width_multiplier=1 / 16)
    v = abstract_variables(model, (1, 32, 32, 3))
    calls = record_convs(model, v, (1, 32, 32, 3))
    assert [c[0] for c in calls] == conv_paths(depth)
    assert set(conv_kernels(v["params"])) == set(conv_paths(depth))


@pytest.mark.parametrize(
    "output_stride,strides,dilations",
    [(8, (1, 2, 1, 1), (1, 1, 2, 4)), (16, (1, 2, 2, 1), (1, 1, 1, 2)), (32, (1, 2, 2, 2), (1, 1, 1, 1))],
)
def test_output_stride_sets_stage_strides_and_dilations(output_stride, strides, dilations):
    model = ResNetD(depth=50, width_multiplier=1 / 16, output_stride=output_stride)
    size = 64
    v = abstract_variables(model, (1, size, size, 3))
    calls = record_convs(model, v, (1, size, size, 3))
    for path, k, stride, dilation, _, _ in calls:
        if not path.startswith("layer"):
            continue
        s = int(path[5]) - 1
        first = path.split("/")[0].endswith("_0")
        strided = path.endswith(("/conv2", "/downsample_conv"))  # the 3×3 conv carries the stride (ResNet-B/D)
        assert stride == (strides[s] if first and strided else 1), path
        assert dilation == (dilations[s] if k == 3 else 1), path  # block 0 of a dilated stage is dilated too
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    out, taps = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, taps=("stem", "layer1", "layer2", "layer3", "layer4")), v, x
    )
    assert taps["stem"].shape[1] == size // 4
    reduction = 4
    for s in range(4):
        reduction *= strides[s]
        assert taps[f"layer{s + 1}"].shape[1:3] == (size // reduction, size // reduction)
    assert out.shape == (1, size // output_stride, size // output_stride, 2048 // 16)


def test_width_multiplier_scales_every_width_rounded_and_at_least_one():
    k = conv_kernels(abstract_variables(ResNetD(depth=50, width_multiplier=0.25), (1, 32, 32, 3))["params"])
    assert k["stem_conv1"].shape == (3, 3, 3, 16)
    assert k["stem_conv3"].shape == (3, 3, 16, 32)
    assert k["layer1_0/conv1"].shape == (1, 1, 32, 16)
    assert k["layer1_0/downsample_conv"].shape == (1, 1, 32, 64)
    assert k["layer4_2/conv3"].shape == (1, 1, 128, 512)
    k = conv_kernels(abstract_variables(ResNetD(depth=50, width_multiplier=0.003), (1, 32, 32, 3))["params"])
    assert k["stem_conv1"].shape[3] == 1  # 64·0.003 = 0.19 → at least 1
    assert k["layer4_0/conv2"].shape == (3, 3, 2, 2)  # 512·0.003 = 1.5 → 2 (half up)
    assert k["layer4_0/conv3"].shape == (1, 1, 2, 8)


def test_bad_config_and_unknown_tap_raise_value_errors():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth"):
        ResNetD(depth=34).init(KEY, x, train=False)
    with pytest.raises(ValueError, match="output_stride"):
        ResNetD(depth=18, output_stride=4).init(KEY, x, train=False)
    with pytest.raises(ValueError, match="unknown tap"):
        jax.eval_shape(lambda x: ResNetD(depth=18).init(KEY, x, train=False, taps=("layer3_0/conv3",)), x)


@pytest.fixture(scope="module")
def tapped_tiny_resnetd50():
    model = ResNetD(depth=50, width_multiplier=1 / 16)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    shapes = abstract_variables(model, x.shape)
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, l: (rng.uniform(0.5, 2.0, l.shape) if p[-1].key == "var" else rng.normal(0, 0.5, l.shape)).astype(
            np.float32
        ),
        shapes,
    )
    names = tap_names(50)
    out, taps = jax.jit(lambda v, x: model.apply(v, x, train=False, taps=names))(variables, x)
    return variables, x, out, {k: np.asarray(v, np.float64) for k, v in taps.items()}


def test_every_tap_name_is_returned(tapped_tiny_resnetd50):
    _, _, out, taps = tapped_tiny_resnetd50
    assert set(taps) == set(tap_names(50))
    np.testing.assert_array_equal(taps["layer4"], np.asarray(out))
    np.testing.assert_array_equal(taps["layer4_2"], np.asarray(out))


def test_taps_match_a_numpy_recomputation_of_the_blocks(tapped_tiny_resnetd50):
    v, x, _, t = tapped_tiny_resnetd50
    p, s = v["params"], v["batch_stats"]

    def bn(y, *path):
        q, r = p, s
        for key in path:
            q, r = q[key], r[key]
        return (y - r["mean"]) / np.sqrt(r["var"] + 1e-5) * q["scale"] + q["bias"]

    relu = lambda y: np.maximum(y, 0)  # noqa: E731

    # Stem: conv → BN → ReLU taps, then the −inf-padded 3×3/2 max-pool.
    stem1 = relu(bn(np_conv(x, p["stem_conv1"]["kernel"], stride=2), "stem_bn1"))
    stem2 = relu(bn(np_conv(t["stem_conv1"], p["stem_conv2"]["kernel"]), "stem_bn2"))
    np.testing.assert_allclose(t["stem_conv2"], stem2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t["stem_conv1"], stem1, rtol=1e-4, atol=1e-4)
    padded = np.pad(t["stem_conv3"], ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h = t["stem_conv3"].shape[1] // 2
    pooled = np.stack(
        [
            np.stack([padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max((1, 2)) for j in range(h)], 1)
            for i in range(h)
        ],
        1,
    )
    np.testing.assert_allclose(t["stem"], pooled, rtol=1e-6)

    def check_block(block, inp, stride, dilation, has_downsample):
        c1 = relu(bn(np_conv(inp, p[block]["conv1"]["kernel"]), block, "bn1"))
        np.testing.assert_allclose(t[f"{block}/conv1"], c1, rtol=1e-4, atol=1e-4)
        c2 = relu(bn(np_conv(t[f"{block}/conv1"], p[block]["conv2"]["kernel"], stride, dilation), block, "bn2"))
        np.testing.assert_allclose(t[f"{block}/conv2"], c2, rtol=1e-4, atol=1e-4)
        c3 = bn(np_conv(t[f"{block}/conv2"], p[block]["conv3"]["kernel"]), block, "bn3")  # no ReLU before the sum
        np.testing.assert_allclose(t[f"{block}/conv3"], c3, rtol=1e-4, atol=1e-4)
        if has_downsample:
            ds = bn(np_conv(inp, p[block]["downsample_conv"]["kernel"], stride), block, "downsample_bn")
            np.testing.assert_allclose(t[f"{block}/downsample_conv"], ds, rtol=1e-4, atol=1e-4)
            shortcut = t[f"{block}/downsample_conv"]
        else:
            shortcut = inp
        np.testing.assert_allclose(t[block], relu(t[f"{block}/conv3"] + shortcut), rtol=1e-4, atol=1e-4)

    check_block("layer1_0", t["stem"], 1, 1, True)
    check_block("layer1_1", t["layer1_0"], 1, 1, False)
    check_block("layer2_0", t["layer1_2"], 2, 1, True)
    check_block("layer3_0", t["layer2_3"], 1, 2, True)
    check_block("layer4_1", t["layer4_0"], 1, 4, False)
