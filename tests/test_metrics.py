"""Split-level metrics against plain numpy implementations, batch-size invariance, the IoU_paper identity, Delta_m."""

import math

import jax
import numpy as np
import pytest

from mtl_sparse_jax import metrics
from mtl_sparse_jax.tasks import get_task

N_EXAMPLES, INPUT, GRID = 7, 32, 8  # input 32x32, logits on an 8x8 grid
NUM_CLASSES, NUM_LOGITS = 4, 5  # one extra logit, as the reference's 41 for NYU's 40 classes
ATTRIBUTES = ("male", "smile")


# ---------------------------------------------------------------------------------------------------------
# Plain numpy references (independent of the code under test)
# ---------------------------------------------------------------------------------------------------------


def np_nearest(x, out):
    n = x.shape[1]
    idx = [min(i * n // out, n - 1) for i in range(out)]
    return x[:, idx][:, :, idx]


def np_bilinear(x, out):
    """PyTorch bilinear, align_corners=False, square images, float64."""
    x = x.astype(np.float64)
    n = x.shape[1]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    shape_h = (1, out, 1) + (1,) * (x.ndim - 3)
    shape_w = (1, 1, out) + (1,) * (x.ndim - 3)
    rows = x[:, lo] * (1 - w.reshape(shape_h)) + x[:, hi] * w.reshape(shape_h)
    return rows[:, :, lo] * (1 - w.reshape(shape_w)) + rows[:, :, hi] * w.reshape(shape_w)


def np_sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def np_seg_iou_paper(raw, labels):
    """smp 'micro-imagewise' IoU: per image, tp/fp/fn summed over all logits' classes, ignore 255."""
    gt = np_nearest(labels, raw.shape[1])
    pred = raw.argmax(-1)
    scores = []
    for g, p in zip(gt, pred):
        valid = g != 255
        tp = fp = fn = 0
        for c in range(raw.shape[-1]):
            tp += np.sum(valid & (p == c) & (g == c))
            fp += np.sum(valid & (p == c) & (g != c))
            fn += np.sum(valid & (g == c) & (p != c))
        scores.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else 0.0)
    return float(np.mean(scores))


def np_seg_standard(raw, labels):
    pred = np_bilinear(raw, labels.shape[1]).argmax(-1)
    valid = labels != 255
    ious = []
    for c in range(NUM_CLASSES):
        inter = np.sum(valid & (pred == c) & (labels == c))
        union = np.sum(valid & ((pred == c) | (labels == c)))
        if union > 0:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.sum(valid & (pred == labels)) / np.sum(valid))


def np_depth(raw, depth, valid, scale):
    pred = np_sigmoid(raw)
    t_small = np_bilinear(depth, raw.shape[1])
    m = t_small > 0
    err = (pred - t_small)[m]
    pred_full = np_bilinear(pred, depth.shape[1])
    mf = (valid > 0) & (depth > 0)
    abs_m = (np.abs(pred_full - depth) * scale[:, None, None, None])[mf]
    rel = (np.abs(pred_full - depth) / np.where(mf, depth, 1))[mf]
    return {
        "mae_paper": np.abs(err).mean(),
        "mse_paper": (err**2).mean(),
        "abs_err_m": abs_m.mean(),
        "rel_err": rel.mean(),
    }


def np_normals(raw, normals):
    pred = np_bilinear(np.tanh(raw.astype(np.float64)), normals.shape[1])
    valid = np.any(normals != 0, axis=-1)
    p = pred[valid]
    g = normals[valid].astype(np.float64)
    cos = np.sum(p * g, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(g, axis=-1))
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    out = {
        "cos_paper": cos.mean(),
        "angle_mean": angle.mean(),
        "angle_median": np.median(angle),
        "angle_rmse": np.sqrt(np.mean(angle**2)),
    }
    for t in (11.25, 22.5, 30, 45):
        out[f"pct_{t:g}"] = 100 * np.mean(angle <= t)
    return out


def np_edge(raw, edge):
    t = np_nearest(edge, raw.shape[1])
    m = t != 0
    return np.abs(np_sigmoid(raw) - t)[m].mean()


def np_attribute(z, y):
    p = np_sigmoid(z)
    pred = (p >= 0.4).astype(int)
    f1s, supports = [], []
    for c in (0, 1):
        tp = np.sum((pred == c) & (y == c))
        precision = tp / np.sum(pred == c) if np.sum(pred == c) else 0.0
        recall = tp / np.sum(y == c) if np.sum(y == c) else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        supports.append(np.sum(y == c))
    return {
        "acc_paper": np.mean(pred == y),
        "f1_weighted": np.dot(f1s, supports) / np.sum(supports),
        "acc": np.mean((p >= 0.5) == y),
    }


# ---------------------------------------------------------------------------------------------------------
# A 7-example split, evaluated in batches of 7, 3 (last one padded) and 1
# ---------------------------------------------------------------------------------------------------------


def make_split():
    rng = np.random.default_rng(0)
    n, s, g = N_EXAMPLES, INPUT, GRID
    labels = rng.integers(0, NUM_CLASSES, (n, s, s)).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < 0.2] = 255
    labels[3] = 255  # an image without any valid pixel scores IoU 0
    depth = rng.uniform(0.1, 1.0, (n, s, s, 1)).astype(np.float32)
    depth_valid = (rng.uniform(size=(n, s, s, 1)) > 0.1).astype(np.float32)
    depth[:, :4, :4] = 0.0  # reference mask: zero target pixels are not scored
    normals = rng.normal(size=(n, s, s, 3)).astype(np.float32)
    normals[rng.uniform(size=(n, s, s)) < 0.15] = 0.0
    edge = (rng.uniform(size=(n, s, s, 1)) > 0.7).astype(np.float32)
    batch = {
        "seg": labels,
        "depth": depth,
        "depth_valid": depth_valid,
        "depth_scale": rng.uniform(5, 10, (n,)).astype(np.float32),
        "normals": normals,
        "edge": edge,
        "weight": np.ones((n,), np.float32),
    }
    for a in ATTRIBUTES:
        batch[a] = rng.integers(0, 2, (n,)).astype(np.float32)
    # Normals raw: the ground truth (scaled into tanh's range) plus noise, so angles spread over 0..180 degrees.
    gt_small = np_bilinear(normals, g)
    raw = {
        "seg": (rng.normal(size=(n, g, g, NUM_LOGITS)) + 2 * np.eye(NUM_LOGITS)[np_nearest(labels % 5, g)]),
        "depth": rng.normal(size=(n, g, g, 1)),
        "normals": np.arctanh(np.clip(0.4 * gt_small + 0.3 * rng.normal(size=(n, g, g, 3)), -0.95, 0.95)),
        "edge": rng.normal(size=(n, g, g, 1)),
    }
    for a in ATTRIBUTES:
        raw[a] = rng.normal(size=(n,))
    return batch, {k: v.astype(np.float32) for k, v in raw.items()}


def build_tasks():
    return {
        "seg": get_task("seg", num_classes=NUM_CLASSES, num_logits=NUM_LOGITS),
        "depth": get_task("depth"),
        "normals": get_task("normals"),
        "edge": get_task("edge"),
        **{a: get_task(a) for a in ATTRIBUTES},
    }


def garbage_like(x, rows):
    """Padding rows: NaN for floats, out-of-range labels for ints (weight 0 must make them irrelevant)."""
    shape = (rows,) + x.shape[1:]
    return np.full(shape, 1000, x.dtype) if np.issubdtype(x.dtype, np.integer) else np.full(shape, np.nan, x.dtype)


def batches(batch, raw, size):
    """Split into batches of ``size``; the last one is padded with weight-0 garbage to the full size."""
    for start in range(0, N_EXAMPLES, size):
        sl = slice(start, start + size)
        b = {k: v[sl] for k, v in batch.items()}
        r = {k: v[sl] for k, v in raw.items()}
        pad = size - b["weight"].shape[0]
        if pad:
            b = {k: np.concatenate([v, garbage_like(v, pad)]) for k, v in b.items()}
            b["weight"][-pad:] = 0.0
            r = {k: np.concatenate([v, garbage_like(v, pad)]) for k, v in r.items()}
        yield b, r


def evaluate(tasks, batch, raw, size, update_fns):
    stats = {name: t.init_stats() for name, t in tasks.items()}
    for b, r in batches(batch, raw, size):
        for name in tasks:
            stats[name] = update_fns[name](stats[name], r[name], b)
    return stats


@pytest.fixture(scope="module")
def split_results():
    batch, raw = make_split()
    tasks = build_tasks()
    update_fns = {name: jax.jit(t.update_stats) for name, t in tasks.items()}
    stats = {size: evaluate(tasks, batch, raw, size, update_fns) for size in (7, 3, 1)}
    results = {
        size: {k: v for name, t in tasks.items() for k, v in t.finalize(s[name]).items()} for size, s in stats.items()
    }
    return batch, raw, tasks, stats, results, update_fns


# ---------------------------------------------------------------------------------------------------------
# Each metric against numpy
# ---------------------------------------------------------------------------------------------------------


def test_segmentation_metrics_match_numpy(split_results):
    batch, raw, _, _, results, _ = split_results
    got = results[7]
    assert got["seg/iou_paper"] == pytest.approx(np_seg_iou_paper(raw["seg"], batch["seg"]), rel=1e-6)
    miou, pixel_acc = np_seg_standard(raw["seg"], batch["seg"])
    assert got["seg/miou"] == pytest.approx(miou, rel=1e-6)
    assert got["seg/pixel_acc"] == pytest.approx(pixel_acc, rel=1e-6)


def test_depth_metrics_match_numpy(split_results):
    batch, raw, _, _, results, _ = split_results
    want = np_depth(raw["depth"], batch["depth"], batch["depth_valid"], batch["depth_scale"])
    for k, v in want.items():
        assert results[7][f"depth/{k}"] == pytest.approx(v, rel=1e-5), k


def test_normals_metrics_match_numpy(split_results):
    batch, raw, _, _, results, _ = split_results
    want = np_normals(raw["normals"], batch["normals"])
    assert 20 < want["angle_median"] < 90  # the angles really spread over the thresholds
    for k, v in want.items():
        # The median is read from a 0.01-degree histogram: exact to half a bin.
        tol = dict(abs=metrics.ANGLE_BIN_DEG / 2 + 1e-4) if k == "angle_median" else dict(rel=1e-5, abs=1e-5)
        assert results[7][f"normals/{k}"] == pytest.approx(v, **tol), k


def test_edge_metric_matches_numpy(split_results):
    batch, raw, _, _, results, _ = split_results
    assert results[7]["edge/mae_paper"] == pytest.approx(np_edge(raw["edge"], batch["edge"]), rel=1e-5)


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_attribute_metrics_match_numpy(split_results, attribute):
    batch, raw, _, _, results, _ = split_results
    for k, v in np_attribute(raw[attribute], batch[attribute]).items():
        assert results[7][f"{attribute}/{k}"] == pytest.approx(v, rel=1e-9), k


# ---------------------------------------------------------------------------------------------------------
# Batch-size invariance and additivity of stats
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 1])
def test_every_metric_and_the_loss_are_batch_size_invariant(split_results, size):
    _, _, _, _, results, _ = split_results
    assert set(results[size]) == set(results[7])
    for k, v in results[7].items():
        tol = dict(abs=metrics.ANGLE_BIN_DEG) if k.endswith("angle_median") else dict(rel=2e-5, abs=1e-6)
        assert results[size][k] == pytest.approx(v, **tol), k


def test_stats_of_parts_add_up(split_results):
    """Stats of disjoint parts (as on different devices), each from init_stats, sum to the split's stats."""
    batch, raw, tasks, stats, _, update_fns = split_results
    parts = [slice(0, 3), slice(3, 6), slice(6, 7)]
    for name, task in tasks.items():
        part_stats = [
            update_fns[name](task.init_stats(), raw[name][sl], {k: v[sl] for k, v in batch.items()}) for sl in parts
        ]
        summed = metrics.add_stats(metrics.add_stats(part_stats[0], part_stats[1]), part_stats[2])
        for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(stats[7][name])):
            if np.issubdtype(np.asarray(want).dtype, np.integer):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
            else:
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# The IoU_paper identity and Delta_m
# ---------------------------------------------------------------------------------------------------------


def test_iou_paper_is_a_over_2_minus_a_per_image():
    """Every wrong valid pixel is one fp and one fn, so IoU_img = A / (2 - A) with A the pixel accuracy."""
    rng = np.random.default_rng(5)
    task = get_task("seg", num_classes=3, num_logits=4)
    update = jax.jit(task.update_stats)
    for accuracy_bias in (0.0, 1.0, 3.0):  # from ~chance to mostly right
        labels = rng.integers(0, 3, (1, 16, 16)).astype(np.int32)
        labels[0, rng.uniform(size=(16, 16)) < 0.3] = 255
        raw = (rng.normal(size=(1, 16, 16, 4)) + accuracy_bias * np.eye(4)[labels[0] % 4]).astype(np.float32)
        valid = labels[0] != 255
        a = np.sum(valid & (raw[0].argmax(-1) == labels[0])) / np.sum(valid)
        got = task.finalize(update(task.init_stats(), raw, {"seg": labels}))["seg/iou_paper"]
        assert got == pytest.approx(a / (2 - a), rel=1e-6)


def test_delta_m():
    mtl = {"seg/iou_paper": 0.33, "depth/mae_paper": 0.09}
    stl = {"seg/iou_paper": 0.30, "depth/mae_paper": 0.10}
    hib = {"seg/iou_paper": True, "depth/mae_paper": False}
    # seg +10 %, depth error down 10 % (an improvement): mean +10 %
    assert metrics.delta_m(mtl, stl, hib) == pytest.approx(10.0, rel=1e-9)
    assert metrics.delta_m(stl, stl, hib) == 0.0
    with pytest.raises(ValueError, match="missing"):
        metrics.delta_m({"seg/iou_paper": 0.3}, stl, hib)


def test_histogram_median_matches_numpy_median():
    rng = np.random.default_rng(6)
    for n in (1, 2, 101, 1000):
        angles = rng.uniform(0, 180, n)
        hist = np.bincount(np.floor(angles / metrics.ANGLE_BIN_DEG).astype(int), minlength=metrics.ANGLE_NUM_BINS)
        assert metrics.histogram_median(hist, metrics.ANGLE_BIN_DEG) == pytest.approx(
            np.median(angles), abs=metrics.ANGLE_BIN_DEG / 2 + 1e-12
        )
    assert math.isnan(metrics.histogram_median(np.zeros(10, int), 0.01))


def test_attribute_weighted_f1_with_one_class_missing_from_predictions():
    """sklearn-style zero_division=0: a class never predicted has F1 0 and still weighs by its support."""
    task = get_task("glasses")
    z = np.full((4,), 5.0, np.float32)  # always predicts 1
    y = np.array([1, 1, 1, 0], np.float32)
    stats = jax.jit(task.update_stats)(task.init_stats(), z, {"glasses": y})
    out = task.finalize(stats)
    # class 1: precision 3/4, recall 1 -> F1 6/7, support 3; class 0: F1 0, support 1
    assert out["glasses/f1_weighted"] == pytest.approx(3 / 4 * 6 / 7, rel=1e-9)
    assert out["glasses/acc_paper"] == pytest.approx(0.75) and out["glasses/acc"] == pytest.approx(0.75)
