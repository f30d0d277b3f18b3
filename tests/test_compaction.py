"""Compaction is exact: the compact model's eval-mode outputs equal the sparse (dense-with-zeros) Flax model's.

Sparsity patterns are drawn here with numpy the way the prox leaves them (whole input-channel groups of backbone
conv kernels set to exactly zero), plus hand-picked cases: whole zeroed convs (constant channels folded through
zero padding), stem colour channels, downsample convs and a residual-stream channel no reader uses.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax import compaction, models

SIZE = 36  # not a power of two: odd feature sizes (9, 5) exercise the padding/stride arithmetic


def _random_variables(module, x, seed):
    """Params with PyTorch-like init and BN parameters drawn in numpy (no jitted Flax init: too slow to compile)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, train=False))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return rng.uniform(-1, 1, s.shape).astype(np.float32) / np.sqrt(fan_in)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if name == "bias":
            return rng.uniform(-0.5, 0.5, s.shape).astype(np.float32)
        if name == "mean":
            return np.zeros(s.shape, np.float32)
        return np.ones(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"]), jax.tree_util.tree_map_with_path(
        draw, shapes["batch_stats"]
    )


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _zero_groups(backbone_params, depth, rng, fraction=0.6, whole=(), channels=None):
    """Zeros a random `fraction` of each conv's input channels (at least one kept), whole convs in `whole`, and
    the (conv → input channels) pairs in `channels`."""
    for path in models.conv_paths(depth):
        k = _get(backbone_params, path)["kernel"]
        cin = k.shape[2]
        if path in whole:
            k[:] = 0
            continue
        zero = rng.random(cin) < fraction
        zero[rng.integers(cin)] = False
        k[:, :, zero, :] = 0
    for path, idx in (channels or {}).items():
        _get(backbone_params, path)["kernel"][:, :, list(idx), :] = 0


def _calibrate(module_kwargs, params, batch_stats, x):
    """Running stats = eval-mode batch statistics of x (one train pass with an effective momentum of 1), so that
    activations stay O(1) through the depth; variances are floored so that near-constant channels do not blow up."""
    calib = models.ResNetD(**module_kwargs, bn_updates=400)
    _, updated = calib.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return jax.tree_util.tree_map_with_path(
        lambda p, a: np.maximum(np.asarray(a), 0.05) if p[-1].key == "var" else np.array(a), updated["batch_stats"]
    )


def _assert_close(actual, expected, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= 1e-5 * scale, f"{what}: max |compact - dense| = {err:.3g} (scale {scale:.3g})"


def _conv_flops_from_taps(module, variables, x, depth):
    """2·MACs of every backbone conv, from the Flax model's own tap shapes and kernel shapes."""
    paths = models.conv_paths(depth)
    _, taps = module.apply(variables, x, train=False, taps=paths)
    total = 0
    for path in paths:
        k = _get(variables["params"], path)["kernel"]
        b, h, w, _ = taps[path].shape
        total += 2 * b * h * w * k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3]
    return total


# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_case():
    """ResNetD-50 at width 1/16 with 60% random group sparsity and every special case at once."""
    kwargs = dict(depth=50, width_multiplier=1 / 16)
    module = models.ResNetD(**kwargs)
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3)))
    params, stats = _random_variables(module, x, seed=0)
    rng = np.random.default_rng(1)
    stream_channel = 5  # of the layer1 stream (16 channels): zeroed in every reader → removable from the stage
    readers = {
        "layer1_1/conv1": [stream_channel],
        "layer1_2/conv1": [stream_channel],
        "layer2_0/conv1": [stream_channel],
        "layer2_0/downsample_conv": [stream_channel],
        "stem_conv1": [0],
    }  # the stem loses its red input channel
    whole = (
        "layer1_1/conv1",  # its constant output meets conv2's zero padding: a spatial bias map
        "layer2_1/conv3",  # the block becomes relu(x + constant)
        "layer3_0/downsample_conv",
    )  # a constant shortcut
    _zero_groups(params, 50, rng, whole=whole, channels=readers)
    # Two zero output filters in a bottleneck's conv1: constant channels relu(β) next to input-dependent ones,
    # which conv2 (3×3) sees through its zero padding.
    params["layer1_2"]["conv1"]["kernel"][..., :2] = 0
    # With layer3_0's shortcut zeroed whole, a zero conv3 filter makes stream channel 3 constant; layer3_1's sum
    # then mixes a computed conv3 channel with a constant skip channel.
    params["layer3_0"]["conv3"]["kernel"][..., 3] = 0
    stats = _calibrate(kwargs, params, stats, x)
    params["layer1_2"]["bn1"]["bias"][:2] = 0.4
    variables = {"params": params, "batch_stats": stats}
    reference = np.asarray(module.apply(variables, x, train=False))
    compact_model = compaction.compact(params, stats, module, input_size=(SIZE, SIZE))
    return dict(
        module=module,
        x=x,
        variables=variables,
        reference=reference,
        compact=compact_model,
        apply=jax.jit(compact_model.apply),
        stream_channel=stream_channel,
        whole=whole,
    )


def test_resnet50_compact_equals_sparse_dense(resnet50_case):
    c = resnet50_case
    out = c["apply"](c["compact"].params, c["x"])
    _assert_close(out, c["reference"], "ResNetD-50 features")


def test_zeroed_groups_are_physically_removed(resnet50_case):
    c = resnet50_case
    cm = c["compact"]
    convs = {op.name: op for op in cm.definition.ops if op.kind == "conv"}
    feeds_residual_sum = {p for p in convs if p.endswith(("conv3", "downsample_conv"))}
    for path in models.conv_paths(50):
        dense_kernel = _get(c["variables"]["params"], path)["kernel"]
        nonzero_groups = int((np.abs(dense_kernel).sum(axis=(0, 1, 3)) > 0).sum())
        widths = cm.widths[path]
        assert widths.in_compact <= nonzero_groups, path
        if path not in convs:
            continue
        kernel = np.asarray(cm.params[path]["kernel"])
        assert kernel.shape == (dense_kernel.shape[0], dense_kernel.shape[1], widths.in_compact, widths.out_compact)
        # No input group left that is all zeros: every zeroed group is gone.
        assert (np.abs(kernel).sum(axis=(0, 1, 3)) > 0).all(), path
        if path not in feeds_residual_sum:
            assert (np.abs(kernel).sum(axis=(0, 1, 2)) > 0).all(), f"{path} keeps an all-zero filter"
    # The stem reads only green and blue.
    assert cm.layout("input") == (1, 2)
    # Whole zeroed convs are not computed at all; their constant outputs were folded.
    for path in c["whole"]:
        assert path not in convs, path
    # conv1 zeroed makes conv2 and conv3 constant too: the block is relu(x + constant map).
    assert "layer1_1/conv2" not in convs and "layer1_1/conv3" not in convs
    assert "layer1_1" in cm.spatial_bias_layers
    # Constant channels next to input-dependent ones: conv2 computes only the others and adds its response to the
    # constants, which varies at the border because of the zero padding.
    assert cm.widths["layer1_2/conv1"].out_compact <= cm.widths["layer1_2/conv1"].out_dense - 2
    assert "layer1_2/conv2" in cm.spatial_bias_layers
    # The residual sums re-order the skip operand where the stream layouts differ (−1: a constant skip channel).
    assert 3 not in cm.layout("layer3_0") and 3 in cm.layout("layer3_1")
    gathers = [op.gather for op in cm.definition.ops if op.kind == "add" and op.gather is not None]
    assert any(-1 in g for g in gathers)
    assert any(-1 not in g for g in gathers)


def test_residual_stream_keeps_channels_that_some_reader_needs(resnet50_case):
    c = resnet50_case
    cm = c["compact"]
    ch = c["stream_channel"]
    # Zeroed in every reader of the layer1 stream (and layer2_0 has no identity skip): gone from the whole stage.
    for block in ("layer1_0", "layer1_1", "layer1_2"):
        assert ch not in cm.layout(block), block
    # The layer3 stream is read by several convs and carried by skips; its width only drops where no reader
    # and no skip needs a channel, so a channel used by some reader stays.
    params = c["variables"]["params"]
    used_by_layer3_2 = np.abs(_get(params, "layer3_2/conv1")["kernel"]).sum(axis=(0, 1, 3)) > 0
    layout = set(cm.layout("layer3_1"))
    assert set(np.flatnonzero(used_by_layer3_2)) <= layout


def test_flop_counts_match_the_architecture(resnet50_case):
    c = resnet50_case
    cm = c["compact"]
    batch = c["x"].shape[0]
    assert cm.dense_flops(batch) == _conv_flops_from_taps(c["module"], c["variables"], c["x"], 50)
    compact_total = 0
    h = w = None
    _, taps = c["module"].apply(c["variables"], c["x"], train=False, taps=models.conv_paths(50))
    for op in cm.definition.ops:
        if op.kind == "conv":
            k = cm.params[op.name]["kernel"]
            _, h, w, _ = taps[op.name].shape
            compact_total += 2 * batch * h * w * int(np.prod(k.shape))
    assert cm.flops(batch) == compact_total
    assert cm.flops(batch) < 0.5 * cm.dense_flops(batch)


def test_bfloat16_runs_and_tracks_float32(resnet50_case):
    c = resnet50_case
    cm = c["compact"]
    out = jax.jit(lambda p, x: cm.apply(p, x, dtype=jnp.bfloat16))(cm.params, c["x"])
    assert out.dtype == jnp.bfloat16
    ref = c["reference"]
    rel = float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())
    assert rel < 0.1


def test_export_round_trip(resnet50_case, tmp_path):
    cm = resnet50_case["compact"]
    path = os.path.join(tmp_path, "model")
    compaction.save_compact(path, cm)
    loaded = compaction.load_compact(path)
    assert loaded.definition == cm.definition
    x = resnet50_case["x"]
    run = resnet50_case["apply"]  # same definition, so the compiled function is reused
    np.testing.assert_array_equal(np.asarray(run(loaded.params, x)), np.asarray(run(cm.params, x)))


def test_spatial_bias_refuses_other_sizes(resnet50_case):
    cm = resnet50_case["compact"]
    with pytest.raises(ValueError, match="input_size"):
        cm(np.zeros((1, SIZE + 4, SIZE + 4, 3), np.float32))


@pytest.mark.parametrize("seed", [0, 1])
def test_resnet18_random_patterns(seed):
    """ResNetD-18 (basic blocks, dilated 3×3 pairs) with random patterns and random whole zeroed convs."""
    kwargs = dict(depth=18, width_multiplier=1 / 16)
    module = models.ResNetD(**kwargs)
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (2, 32, 32, 3)))
    params, stats = _random_variables(module, x, seed=seed)
    rng = np.random.default_rng(10 + seed)
    candidates = [p for p in models.conv_paths(18) if not p.startswith("stem")]
    whole = tuple(rng.choice(candidates, size=3, replace=False))
    _zero_groups(params, 18, rng, fraction=0.5, whole=whole)
    stats = _calibrate(kwargs, params, stats, x)
    # Zero BN scales on a few channels too: their outputs are constant (β) whatever the kernel.
    params["layer2_1"]["bn1"]["scale"][:2] = 0
    reference = module.apply({"params": params, "batch_stats": stats}, x, train=False)
    cm = compaction.compact(params, stats, module, input_size=(32, 32))
    _assert_close(cm(x), reference, f"ResNetD-18 seed {seed}, whole {whole}")
    for path in whole:
        assert path not in {op.name for op in cm.definition.ops}
    assert cm.widths["layer2_1/conv1"].out_compact <= 8 - 2


def test_fully_constant_network():
    """A zeroed first conv makes every activation constant: nothing is left to compute, outputs still match."""
    module = models.ResNetD(depth=18, width_multiplier=1 / 16)
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (2, 32, 32, 3)))
    params, stats = _random_variables(module, x, seed=3)
    params["stem_conv1"]["kernel"][:] = 0
    cm = compaction.compact(params, stats, module, input_size=(32, 32))
    assert not [op for op in cm.definition.ops if op.kind == "conv"]
    _assert_close(cm(x), module.apply({"params": params, "batch_stats": stats}, x, train=False), "constant net")


def test_multitask_heads_and_features():
    heads = (
        models.HeadSpec("seg", "deeplab", 5),
        models.HeadSpec("depth", "deeplab", 1),
        models.HeadSpec("smile", "classification", 1),
    )
    module = models.MultiTaskModel(heads=heads, depth=18, width_multiplier=1 / 16, head_width_multiplier=1 / 16)
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 32, 3)))
    params, stats = _random_variables(module, x, seed=4)
    rng = np.random.default_rng(4)
    _zero_groups(params["backbone"], 18, rng, fraction=0.6, whole=("layer3_1/conv1",))
    stats["backbone"] = _calibrate(dict(depth=18, width_multiplier=1 / 16), params["backbone"], stats["backbone"], x)
    params["loss_weights"] = {"seg": np.zeros(())}  # train-state extras are ignored
    variables = {"params": {k: v for k, v in params.items() if k != "loss_weights"}, "batch_stats": stats}
    reference, taps = module.apply(variables, x, train=False, taps=("layer4",))
    cm = compaction.compact(params, stats, module, input_size=(32, 32))
    outputs, features = cm(x, return_features=True)
    assert set(outputs) == {"seg", "depth", "smile"}
    for task in outputs:
        _assert_close(outputs[task], reference[task], task)
    _assert_close(features, taps["layer4"], "backbone features")


def test_mismatched_params_name_the_key():
    module = models.ResNetD(depth=18, width_multiplier=1 / 16)
    x = np.zeros((1, 32, 32, 3), np.float32)
    params, stats = _random_variables(module, x, seed=0)
    del stats["layer1_0"]["bn1"]
    with pytest.raises(compaction.CompactionError, match="layer1_0/bn1"):
        compaction.compact(params, stats, module, input_size=(32, 32))
    with pytest.raises(compaction.CompactionError, match="ResNetD-50"):
        compaction.compact(params, stats, models.ResNetD(depth=50), input_size=(32, 32))
