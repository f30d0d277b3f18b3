"""Group selection by regex on param paths, sparsity statistics, and the benchmark's ResNetD-50 shape table."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax import sparsity

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _fake_params():
    """A small tree with the project's naming (docs/architecture.md): stem, blocks, downsample, BN, heads."""
    k = lambda *s: np.ones(s, np.float32)
    backbone = {
        "stem_conv1": {"kernel": k(3, 3, 3, 4)},
        "stem_conv2": {"kernel": k(3, 3, 4, 4)},
        "stem_bn1": {"scale": k(4), "bias": k(4)},
    }
    for b in (0, 1, 2, 10):  # 'layer1_10' sorts before 'layer1_2' as a plain string
        blk = {
            "conv1": {"kernel": k(1, 1, 4, 2)},
            "conv2": {"kernel": k(3, 3, 2, 2)},
            "conv3": {"kernel": k(1, 1, 2, 4)},
            "bn1": {"scale": k(2), "bias": k(2)},
        }
        if b == 0:
            blk["downsample_conv"] = {"kernel": k(1, 1, 4, 4)}
        backbone[f"layer1_{b}"] = blk
    return {
        "backbone": backbone,
        "head_seg": {"conv": {"kernel": k(3, 3, 4, 5)}, "classifier": {"kernel": k(1, 1, 5, 3), "bias": k(3)}},
        "head_cls": {"dense": {"kernel": k(4, 1)}},
    }


FORWARD = ["backbone/stem_conv1/kernel", "backbone/stem_conv2/kernel"] + [
    f"backbone/layer1_{b}/{c}/kernel"
    for b in (0, 1, 2, 10)
    for c in ("conv1", "conv2", "conv3") + (("downsample_conv",) if b == 0 else ())
]


def test_default_groups_are_backbone_conv_kernels_on_the_input_channel_axis():
    params = _fake_params()
    axes = sparsity.default_group_axes(params)
    flat = {
        sparsity.path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None)[0]
    }
    grouped = sorted(p for p, a in flat.items() if a is not None)
    assert grouped == sorted(FORWARD)  # stem and downsample included, BN / heads / biases excluded
    assert all(flat[p] == 2 for p in grouped)
    assert flat["head_seg/conv/kernel"] is None and flat["backbone/stem_bn1/scale"] is None
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda a: 0, axes, is_leaf=lambda x: x is None)
    )
    # group size and count of an HWIO kernel on axis 2
    assert sparsity.group_size((3, 3, 64, 128), 2) == 3 * 3 * 128 and sparsity.num_groups((3, 3, 64, 128), 2) == 64


def test_regex_rules_first_match_wins_and_none_excludes():
    params = _fake_params()
    rules = (
        (r"stem_conv1", None),  # keep the RGB input channels
        (r"^backbone/.*kernel$", -2),  # negative axes are normalised
        (r"^head_seg/.*kernel$", 3),
    )  # output channels of head convs
    axes = sparsity.group_axes_by_regex(params, rules)
    assert axes["backbone"]["stem_conv1"]["kernel"] is None
    assert axes["backbone"]["layer1_0"]["conv2"]["kernel"] == 2
    assert axes["head_seg"]["conv"]["kernel"] == 3
    assert axes["head_cls"]["dense"]["kernel"] is None  # 2-D: excluded by ndim=4
    axes2 = sparsity.group_axes_by_regex(params, ((r"dense/kernel$", 1),), ndim=None)
    assert axes2["head_cls"]["dense"]["kernel"] == 1
    with pytest.raises(ValueError, match="out of range"):
        sparsity.group_axes_by_regex(params, ((r"kernel$", 4),))


def test_stats_counts_groups_params_and_output_filters_in_forward_order():
    params = _fake_params()
    bb = params["backbone"]
    bb["stem_conv2"]["kernel"][:, :, 1, :] = 0  # one input channel of 4
    bb["layer1_2"]["conv1"]["kernel"][:] = 0  # a whole layer: 4 groups, 2 output filters
    bb["layer1_10"]["conv3"]["kernel"][0, 0, 0, 3] = 0  # a lone zero: counts as a zero param only
    bb["layer1_1"]["conv2"]["kernel"][:, :, :, 0] = 0  # an output filter, no input group
    axes = sparsity.default_group_axes(params)
    s = sparsity.stats(params, axes)

    shapes = {p: _get(params, p).shape for p in FORWARD}
    total_groups = sum(sh[2] for sh in shapes.values())
    total_params = sum(int(np.prod(sh)) for sh in shapes.values())
    assert s["num_groups"] == total_groups and s["num_zero_groups"] == 1 + 4
    assert s["group_sparsity"] == pytest.approx(100 * 5 / total_groups)
    zero_params = 3 * 3 * 4 + 4 * 2 + 1 + 3 * 3 * 2
    assert s["num_zero_params"] == zero_params
    assert s["param_sparsity"] == pytest.approx(100 * zero_params / total_params)
    assert s["params_in_zero_groups"] == pytest.approx(100 * (3 * 3 * 4 + 4 * 2) / total_params)
    assert s["zero_output_filters"] == 2 + 1
    assert s["total_output_filters"] == sum(sh[3] for sh in shapes.values())
    assert s["num_zero_layers"] == 1 and s["num_layers"] == len(FORWARD)

    assert [row[0] for row in s["per_layer"]] == FORWARD  # natural order, stem first
    rows = {p: (a, t) for p, a, t in s["per_layer"]}
    assert rows["backbone/stem_conv2/kernel"] == (3, 4)
    assert rows["backbone/layer1_2/conv1/kernel"] == (0, 4)
    assert rows["backbone/layer1_1/conv2/kernel"] == (2, 2)

    explicit = list(reversed(FORWARD[:3]))
    s2 = sparsity.stats(params, axes, layer_order=explicit)
    assert [row[0] for row in s2["per_layer"]] == explicit + FORWARD[3:]
    with pytest.raises(ValueError, match="not grouped leaves"):
        sparsity.stats(params, axes, layer_order=["backbone/typo/kernel"])


def test_sparsity_counts_is_jittable_and_counts_exact_zeros_not_small_norms():
    x = np.full((1, 1, 3, 2), 1e-30, np.float32)  # the squared norm underflows, the group is not zero
    x[0, 0, 1] = 0
    params = {"backbone": {"c": {"kernel": x}}}
    axes = sparsity.default_group_axes(params)
    counts = jax.jit(lambda p: sparsity.sparsity_counts(p, axes))(params)
    np.testing.assert_array_equal(counts, [[1, 2, 0]])


def test_resolve_group_axes_accepts_callables_and_rejects_mismatches():
    params = _fake_params()
    assert sparsity.resolve_group_axes(sparsity.default_group_axes, params) == sparsity.default_group_axes(params)
    with pytest.raises(ValueError, match="structure of the params"):
        sparsity.resolve_group_axes({"backbone": None}, params)
    bad = sparsity.default_group_axes(params)
    bad["backbone"]["stem_conv1"]["kernel"] = 2.0
    with pytest.raises(TypeError, match="int or None"):
        sparsity.resolve_group_axes(bad, params)
    bad["backbone"]["stem_conv1"]["kernel"] = 4
    with pytest.raises(ValueError, match="out of range for backbone/stem_conv1/kernel"):
        sparsity.resolve_group_axes(bad, params)


def test_benchmark_builds_the_exact_resnetd50_backbone_shapes():
    spec = importlib.util.spec_from_file_location("prox_overhead", os.path.join(ROOT, "benchmarks", "prox_overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shapes = mod.resnetd50_conv_shapes(1.0)
    # Reference §2.1: 55 conv kernels, 22,787 input-channel groups, 23,578,304 conv weights, 26,752 filters.
    assert len(shapes) == 55
    assert sum(s[2] for s in shapes.values()) == 22787
    assert sum(int(np.prod(s)) for s in shapes.values()) == 23578304
    assert sum(s[3] for s in shapes.values()) == 26752
    params = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), _nest(shapes), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert len(sparsity.flatten_grouped(params, sparsity.default_group_axes)) == 55


def test_sparsity_package_imports_no_models_data_or_tensorflow():
    code = (
        "import sys; from mtl_sparse_jax import sparsity; "
        'bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets") '
        'or m.startswith(("mtl_sparse_jax.models", "mtl_sparse_jax.data.pipeline", "data_prep"))]; '
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _nest(flat):
    out = {}
    for path, v in flat.items():
        node = out
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = v
    return out
