"""Per-task losses against hand-computed values, and the loss combiners' values and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax import losses
from mtl_sparse_jax.tasks import get_task


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ratio(terms):
    num, den = terms
    return float(num) / float(den)


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


def test_segmentation_loss_smoothed_ce_counts_ignored_pixels_in_denominator():
    # Logits on a 2x2 grid, 3 logits; labels on a 4x4 grid, so the loss reads label pixels (2i, 2j).
    logits = np.array([[[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]]]], np.float32)
    labels = np.full((1, 4, 4), 7, np.int32)  # off-grid pixels: never read
    labels[0, 0, 0], labels[0, 0, 2], labels[0, 2, 0], labels[0, 2, 2] = 0, 255, 1, 0
    batch = {"seg": labels, "weight": np.ones((1,), np.float32)}
    logp = np_log_softmax(logits)[0]
    kept = [((0, 0), 0), ((1, 0), 1), ((1, 1), 0)]  # (grid position, label); (0, 1) is ignored
    nll = sum(-logp[pos][y] for pos, y in kept)
    smooth = sum(-logp[pos].sum() for pos, _ in kept)
    expected = (0.9 * nll + 0.1 / 3 * smooth) / 4  # 4 pixels, the ignored one included
    task = get_task("seg", num_classes=3)
    num, den = jax.jit(task.loss_terms)(jnp.asarray(logits), batch)
    assert float(den) == 4.0
    assert ratio((num, den)) == pytest.approx(expected, rel=1e-6)


def test_segmentation_smoothing_uses_number_of_logits():
    """With 41 logits for 40 classes, the smoothing mass is 0.1/41 per logit (smp's C = logits' channel size)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 1, 1, 5)).astype(np.float32)
    batch = {"seg": np.array([[[2]]], np.int32)}
    logp = np_log_softmax(logits)[0, 0, 0]
    expected = 0.9 * -logp[2] + 0.1 / 5 * -logp.sum()
    got = ratio(jax.jit(losses.segmentation_loss_terms)(jnp.asarray(logits), batch))
    assert got == pytest.approx(expected, rel=1e-6)
    task = get_task("seg", num_classes=4, num_logits=5)
    assert task.out_channels == 5
    assert float(jax.jit(task.loss)(jnp.asarray(logits), batch)) == pytest.approx(expected, rel=1e-6)


def test_segmentation_gradient_is_softmax_minus_smoothed_target():
    """d loss / d z = (softmax(z) - (0.9 onehot(y) + 0.1/C)) / N at labelled pixels, 0 at ignored ones."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    labels = np.array([[[0, 2], [255, 1]]], np.int32)
    grad = np.asarray(jax.jit(jax.grad(get_task("seg", num_classes=3).loss))(jnp.asarray(logits), {"seg": labels}))
    p = np.exp(np_log_softmax(logits))
    target = 0.9 * np.eye(3)[np.where(labels == 255, 0, labels)] + 0.1 / 3
    want = np.where((labels != 255)[..., None], p - target, 0.0) / 4
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_segmentation_input_resolution_upsamples_logits():
    # A 1x1 logit map upsamples to the same logits at every input pixel.
    logits = np.array([[[[1.0, -2.0, 0.5]]]], np.float32)
    labels = np.array([[[0, 2, 255], [1, 1, 0]]], np.int32)
    logp = np_log_softmax(logits)[0, 0, 0]
    kept = [0, 2, 1, 1, 0]
    expected = sum(0.9 * -logp[y] + 0.1 / 3 * -logp.sum() for y in kept) / 6
    task = get_task("seg", num_classes=3, loss_resolution="input")
    assert float(jax.jit(task.loss)(jnp.asarray(logits), {"seg": labels})) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Depth, normals, edge
# ---------------------------------------------------------------------------------------------------------


def test_depth_loss_is_mse_of_sigmoid_against_half_pixel_downsampled_target():
    raw = np.array([[[[0.3]], [[-1.0]]]], np.float32).reshape(1, 2, 1, 1)  # grid 2x1
    # target 4x2 -> 2x1: half-pixel bilinear = mean of each 2x2 block
    target = np.array([[[0.2, 0.4], [0.6, 0.8], [0.0, 0.0], [0.0, 0.0]]], np.float32)[..., None]
    batch = {"depth": target}
    pred = np_sigmoid(raw.reshape(-1))
    # second cell's target is 0: the reference zeroes that pixel in both, but keeps it in the mean
    expected = ((pred[0] - 0.5) ** 2 + 0.0) / 2
    got = ratio(jax.jit(get_task("depth").loss_terms)(jnp.asarray(raw), batch))
    assert got == pytest.approx(expected, rel=1e-6)


def test_normals_loss_is_mean_one_minus_cos_over_valid_pixels():
    raw = np.array([[[[0.2, 0.1, 0.9], [1.0, -1.0, 0.0]], [[0.3, 0.3, 0.3], [0.5, 0.0, 0.0]]]], np.float32)
    target = np.array([[[[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]]], np.float32)
    pred = np.tanh(raw.astype(np.float64))[0].reshape(-1, 3)
    gt = target[0].reshape(-1, 3).astype(np.float64)
    costs = []
    for p, g in zip(pred, gt):
        if np.any(g != 0):
            costs.append(1 - p @ g / (np.linalg.norm(p) * np.linalg.norm(g)))
    expected = np.mean(costs)
    num, den = jax.jit(get_task("normals").loss_terms)(jnp.asarray(raw), {"normals": target})
    assert float(den) == 3.0
    assert ratio((num, den)) == pytest.approx(expected, rel=1e-6)
    # A perfect prediction has zero loss: 1 - cos(v, v) = 0 whatever v's length (tanh saturates, so use v/10).
    perfect = np.arctanh(target / 10)
    perfect_loss = jax.jit(get_task("normals").loss)(jnp.asarray(perfect), {"normals": target})
    assert float(perfect_loss) == pytest.approx(0.0, abs=1e-6)


def test_edge_loss_is_huber_delta_02_on_sigmoid():
    raw = np.array([0.0, 2.0, -3.0, 0.1], np.float32).reshape(1, 2, 2, 1)
    target = np.array([0.45, 0.0, 1.0, 0.5], np.float32).reshape(1, 2, 2, 1)
    x = np_sigmoid(raw.reshape(-1)) - target.reshape(-1)
    # Huber(0.2): 0.5 x^2 inside |x| < 0.2, 0.2 (|x| - 0.1) outside
    per_pixel = [0.5 * v**2 if abs(v) < 0.2 else 0.2 * (abs(v) - 0.1) for v in x]
    assert any(abs(v) < 0.2 for v in x) and any(abs(v) >= 0.2 for v in x)
    got = ratio(jax.jit(get_task("edge").loss_terms)(jnp.asarray(raw), {"edge": target}))
    assert got == pytest.approx(np.mean(per_pixel), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Attributes
# ---------------------------------------------------------------------------------------------------------


def test_attribute_loss_is_bce_with_one_sigmoid():
    z = np.array([2.0, -1.0, 0.5], np.float32)
    y = np.array([1.0, 1.0, 0.0], np.float32)
    p = np_sigmoid(z)
    expected = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    got = float(jax.jit(get_task("male").loss)(jnp.asarray(z), {"male": y}))
    assert got == pytest.approx(expected, rel=1e-6)


def test_double_sigmoid_reproduces_reference_and_its_loss_floor():
    z = np.array([0.3, -2.0], np.float32)
    y = np.array([1.0, 0.0], np.float32)
    q = np_sigmoid(np_sigmoid(z))  # BCEWithLogits applied to a probability
    expected = np.mean(-(y * np.log(q) + (1 - y) * np.log(1 - q)))
    task = get_task("smile", double_sigmoid=True)
    assert float(jax.jit(task.loss)(jnp.asarray(z), {"smile": y})) == pytest.approx(expected, rel=1e-6)
    # Even a perfectly confident logit cannot go below log(1+e)-1 for y=1 and log 2 for y=0.
    sure = np.array([50.0, -50.0], np.float32)
    num, den = jax.jit(task.loss_terms)(jnp.asarray(sure), {"smile": y})
    assert float(num) == pytest.approx((math.log(1 + math.e) - 1) + math.log(2), rel=1e-5)
    assert float(den) == 2.0


# ---------------------------------------------------------------------------------------------------------
# Padding and errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_resolution", ["feature", "input"])
def test_padded_examples_contribute_nothing(loss_resolution):
    rng = np.random.default_rng(1)
    real = {
        "seg": rng.integers(0, 4, (2, 16, 16)).astype(np.int32),
        "depth": rng.uniform(0.1, 1.0, (2, 16, 16, 1)).astype(np.float32),
        "normals": rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
        "edge": rng.uniform(size=(2, 16, 16, 1)).astype(np.float32),
    }
    raw = {
        "seg": rng.normal(size=(2, 4, 4, 4)),
        "depth": rng.normal(size=(2, 4, 4, 1)),
        "normals": rng.normal(size=(2, 4, 4, 3)),
        "edge": rng.normal(size=(2, 4, 4, 1)),
    }
    # Padding: a third example of garbage (huge raw values, out-of-range targets) with weight 0.
    padded = {k: np.concatenate([v, 1e3 * np.ones_like(v[:1])]) for k, v in real.items()}
    padded["weight"] = np.array([1.0, 1.0, 0.0], np.float32)
    raw_padded = {k: np.concatenate([v, 1e3 * np.ones_like(v[:1])]) for k, v in raw.items()}
    for name in raw:
        opts = {"num_classes": 4} if name == "seg" else {}
        task = get_task(name, loss_resolution=loss_resolution, **opts)
        loss_terms = jax.jit(task.loss_terms)
        want = loss_terms(jnp.asarray(raw[name], jnp.float32), real)
        got = loss_terms(jnp.asarray(raw_padded[name], jnp.float32), padded)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, err_msg=name)


def test_missing_batch_key_names_the_key():
    with pytest.raises(KeyError, match="'normals'"):
        get_task("normals").loss_terms(jnp.zeros((1, 2, 2, 3)), {"seg": np.zeros((1, 8, 8), np.int32)})


def test_wrong_raw_shape_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"\[B,h,w,1\]"):
        get_task("depth").loss_terms(jnp.zeros((1, 2, 2, 3)), {"depth": np.zeros((1, 8, 8, 1), np.float32)})


# ---------------------------------------------------------------------------------------------------------
# Combiners
# ---------------------------------------------------------------------------------------------------------

TASK_LOSSES = {"seg": 2.5, "depth": 0.04, "normals": 0.7}


def test_uncertainty_is_paper_eq2_and_its_gradient():
    s = {"seg": 0.3, "depth": -1.2, "normals": 0.0}
    weights = {t: jnp.asarray(v) for t, v in s.items()}
    total = losses.combine_losses("uncertainty", TASK_LOSSES, weights)
    # Paper Eq. 2 with sigma^2 = exp(s): L / (2 sigma^2) + log sigma
    expected = sum(TASK_LOSSES[t] / (2 * math.exp(s[t])) + math.log(math.sqrt(math.exp(s[t]))) for t in s)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    grads = jax.grad(lambda w: losses.combine_losses("uncertainty", TASK_LOSSES, w))(weights)
    for t in s:
        assert float(grads[t]) == pytest.approx(0.5 - 0.5 * math.exp(-s[t]) * TASK_LOSSES[t], rel=1e-6)


def test_uncertainty_starts_at_sigma_one_and_learns():
    weights = losses.init_loss_weights("uncertainty", list(TASK_LOSSES))
    total = losses.combine_losses("uncertainty", TASK_LOSSES, weights)
    assert float(total) == pytest.approx(0.5 * sum(TASK_LOSSES.values()), rel=1e-6)
    grads = jax.grad(lambda w: losses.combine_losses("uncertainty", TASK_LOSSES, w))(weights)
    assert all(float(g) != 0.0 for g in grads.values())


def test_uncertainty_reference_is_fixed_exp_minus_one_plus_one_with_zero_gradient():
    weights = {t: jnp.asarray(0.7) for t in TASK_LOSSES}  # whatever is passed, the reference's s is 1
    total = losses.combine_losses("uncertainty_reference", TASK_LOSSES, weights)
    assert float(total) == pytest.approx(sum(math.exp(-1) * v + 1 for v in TASK_LOSSES.values()), rel=1e-6)
    grads = jax.grad(lambda w: losses.combine_losses("uncertainty_reference", TASK_LOSSES, w))(weights)
    assert all(float(g) == 0.0 for g in grads.values())


def test_sum_fixed_and_active_flags():
    assert float(losses.combine_losses("sum", TASK_LOSSES)) == pytest.approx(sum(TASK_LOSSES.values()), rel=1e-6)
    fixed = {"seg": 1.0, "depth": 10.0, "normals": 0.5}
    want = sum(fixed[t] * v for t, v in TASK_LOSSES.items())
    assert float(losses.combine_losses("fixed", TASK_LOSSES, fixed_weights=fixed)) == pytest.approx(want, rel=1e-6)
    # A stopped task leaves the total, even if its loss is NaN, and its log-variance gets no gradient.
    with_nan = dict(TASK_LOSSES, depth=float("nan"))
    active = {"depth": jnp.asarray(0.0)}
    assert float(losses.combine_losses("sum", with_nan, active=active)) == pytest.approx(2.5 + 0.7, rel=1e-6)
    ref = losses.combine_losses("uncertainty_reference", TASK_LOSSES, active=active)
    assert float(ref) == pytest.approx(math.exp(-1) * 3.2 + 2, rel=1e-6)
    weights = losses.init_loss_weights("uncertainty", list(TASK_LOSSES))
    grads = jax.grad(lambda w: losses.combine_losses("uncertainty", TASK_LOSSES, w, active=active))(weights)
    assert float(grads["depth"]) == 0.0 and float(grads["seg"]) != 0.0


def test_combiner_errors():
    with pytest.raises(ValueError, match="known: uncertainty"):
        losses.combine_losses("mean", TASK_LOSSES)
    with pytest.raises(ValueError, match="missing"):
        losses.combine_losses("uncertainty", TASK_LOSSES, {"seg": 0.0})
    with pytest.raises(ValueError, match="fixed_weights"):
        losses.combine_losses("fixed", TASK_LOSSES, fixed_weights={"seg": 1.0})
