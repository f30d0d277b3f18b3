"""Multi-task model: outputs and param tree, the backbone applied once (call count and XLA FLOPs), dropout only in
train mode, bf16 compute with fp32 params and outputs, and the reference's T-fold BN running-stat updates."""

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax.models import BatchNorm, ClassificationHead, DeepLabHead, HeadSpec, MultiTaskModel, ResNetD

KEY = jax.random.key(0, impl="rbg")
HEADS = (HeadSpec("seg", "deeplab", 5), HeadSpec("depth", "deeplab", 1), HeadSpec("smile", "classification", 1))
TINY = dict(depth=18, width_multiplier=1 / 16, head_width_multiplier=1 / 16)
X_SHAPE = (4, 32, 32, 3)


def random_variables(model, shape, seed=0):
    """Random params at PyTorch-init scale and random BN statistics, from the abstract init (no init compile)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        last = path[-1].key
        if last == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if last == "mean":
            return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        if last == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if last == "kernel" else 16
        bound = 1 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = MultiTaskModel(HEADS, **TINY)
    variables = random_variables(model, X_SHAPE)
    x = np.random.default_rng(1).uniform(size=X_SHAPE).astype(np.float32)
    apply_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return model, variables, x, apply_eval


def test_outputs_and_param_tree(tiny):
    model, v, x, apply_eval = tiny
    assert set(v["params"]) == {"backbone", "head_seg", "head_depth", "head_smile"}
    assert set(v["batch_stats"]) == {"backbone", "head_seg", "head_depth"}  # the classification head has no BN
    out = apply_eval(v, x)
    assert set(out) == {"seg", "depth", "smile"}
    assert out["seg"].shape == (4, 4, 4, 5) and out["depth"].shape == (4, 4, 4, 1)
    assert out["smile"].shape == (4,)
    assert all(o.dtype == jnp.float32 and np.isfinite(np.asarray(o)).all() for o in out.values())


def test_model_output_is_the_heads_applied_to_the_backbone_features(tiny):
    model, v, x, apply_eval = tiny
    out = apply_eval(v, x)
    backbone = ResNetD(depth=18, width_multiplier=1 / 16)
    sub = lambda name: {c: v[c][name] for c in v if name in v[c]}  # noqa: E731
    feats = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(sub("backbone"), x)
    seg = jax.jit(lambda v, f: DeepLabHead(5, channels=16).apply(v, f, train=False))(sub("head_seg"), feats)
    smile = jax.jit(lambda v, f: ClassificationHead(hidden=4, dense=2).apply(v, f, train=False))(
        sub("head_smile"), feats
    )
    np.testing.assert_allclose(out["seg"], seg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["smile"], smile, rtol=1e-4, atol=1e-5)


def test_backbone_is_called_once_for_three_heads():
    calls = []

    def count(next_fun, args, kwargs, context):
        if isinstance(context.module, ResNetD) and context.method_name == "__call__":
            calls.append(context.module.name)
        return next_fun(*args, **kwargs)

    model = MultiTaskModel(HEADS, **TINY)
    x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    with nn.intercept_methods(count):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": KEY}, mutable=["batch_stats"]), v, x)
    assert calls == ["backbone"]


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_flops_of_three_heads_are_one_backbone_plus_the_heads():
    # Independent of the module structure: XLA's own FLOP count of the whole model must equal one backbone plus
    # each head run alone on the features; a per-task backbone re-run would add two more backbones.
    model = MultiTaskModel(HEADS, **TINY)
    x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    sub = lambda name: {c: v[c][name] for c in v if name in v[c]}  # noqa: E731
    total = _flops(lambda v, x: model.apply(v, x, train=False), v, x)
    backbone = ResNetD(depth=18, width_multiplier=1 / 16)
    flops_backbone = _flops(lambda v, x: backbone.apply(v, x, train=False), sub("backbone"), x)
    feats = jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False), sub("backbone"), x)
    heads = {
        "seg": DeepLabHead(5, channels=16),
        "depth": DeepLabHead(1, channels=16),
        "smile": ClassificationHead(hidden=4, dense=2),
    }
    flops_heads = sum(
        _flops(lambda v, f, h=h: h.apply(v, f, train=False), sub(f"head_{n}"), feats) for n, h in heads.items()
    )
    assert abs(total - (flops_backbone + flops_heads)) <= 0.01 * flops_backbone


@pytest.mark.parametrize(
    "head", [DeepLabHead(3, channels=8), ClassificationHead(hidden=8, dense=8)], ids=["deeplab", "classification"]
)
def test_dropout_only_in_train_mode(head):
    x = np.random.default_rng(2).normal(size=(4, 6, 6, 8)).astype(np.float32)
    v = random_variables(head, x.shape)
    train = jax.jit(lambda v, x, rng: head.apply(v, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])[0])
    evaluate = jax.jit(lambda v, x, rng: head.apply(v, x, train=False, rngs={"dropout": rng}))
    a, b, a2 = train(v, x, jax.random.key(1)), train(v, x, jax.random.key(2)), train(v, x, jax.random.key(1))
    assert not np.allclose(a, b)  # different dropout masks
    np.testing.assert_array_equal(a, a2)  # same rng, same masks
    np.testing.assert_array_equal(evaluate(v, x, jax.random.key(1)), evaluate(v, x, jax.random.key(2)))
    no_rng = jax.jit(lambda v, x: head.apply(v, x, train=False))(v, x)  # eval needs no dropout rng
    np.testing.assert_array_equal(evaluate(v, x, jax.random.key(1)), no_rng)
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]), v, x)


def test_bf16_compute_keeps_fp32_params_and_outputs_and_is_close_to_fp32(tiny):
    _, v, x, apply_eval = tiny
    model16 = MultiTaskModel(HEADS, dtype=jnp.bfloat16, **TINY)
    v16 = jax.eval_shape(lambda x: model16.init(KEY, x, train=False), jax.ShapeDtypeStruct(X_SHAPE, jnp.float32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v16))
    out16, taps = jax.jit(lambda v, x: model16.apply(v, x, train=False, taps=("layer2_0/conv1",)))(v, x)
    out32 = apply_eval(v, x)
    assert taps["layer2_0/conv1"].dtype == jnp.bfloat16
    for name in out32:
        assert out16[name].dtype == jnp.float32
        ref = np.asarray(out32[name])
        err = np.linalg.norm(np.asarray(out16[name]) - ref) / np.linalg.norm(ref)
        # bf16 keeps 8 significant bits (relative rounding 2^-9); ~20 layers of rounding stay well under 5 %.
        assert err < 0.05, (name, err)


def _bn_update_counts(model):
    counts = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
            counts["/".join(context.module.scope.path)] = context.module.num_updates
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": KEY}, mutable=["batch_stats"]), v, x)
    return counts


def test_reference_bn_updates_apply_backbone_updates_once_per_task():
    # Numerically, num_updates=T equals T successive updates (tested on BatchNorm itself); here: which BNs get T.
    counts = _bn_update_counts(MultiTaskModel(HEADS, reference_bn_updates=True, **TINY))
    backbone = {k: n for k, n in counts.items() if k.startswith("backbone/")}
    heads = {k: n for k, n in counts.items() if k.startswith("head_")}
    assert len(backbone) == 3 + 8 * 2 + 4 and heads
    assert set(backbone.values()) == {len(HEADS)} and set(heads.values()) == {1}
    assert set(_bn_update_counts(MultiTaskModel(HEADS, **TINY)).values()) == {1}


def test_single_task_model_is_the_same_class_with_one_head():
    model = MultiTaskModel([HeadSpec("depth", "deeplab", 1)], **TINY)
    x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    out, taps = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, taps=("stem",)), v, x)
    assert set(v["params"]) == {"backbone", "head_depth"}
    assert out["depth"].shape == (4, 4, 4, 1) and taps["stem"].shape == (4, 8, 8, 8)


def test_head_specs_may_be_given_as_mappings_or_tuples():
    model = MultiTaskModel(
        [{"name": "depth", "kind": "deeplab", "out_channels": 1}, ("smile", "classification", 1)], **TINY
    )
    x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
    assert out["depth"].shape == (4, 4, 4, 1) and out["smile"].shape == (4,)


def test_bad_head_specs_raise_value_errors():
    with pytest.raises(ValueError, match="kind"):
        HeadSpec("seg", "unet", 3)
    with pytest.raises(ValueError, match="out_channels must be 1"):
        HeadSpec("male", "classification", 2)
    with pytest.raises(ValueError, match="unique"):
        x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
        model = MultiTaskModel([HeadSpec("a", "deeplab", 1), HeadSpec("a", "deeplab", 2)], **TINY)
        jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
