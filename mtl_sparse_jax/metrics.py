"""Split-level evaluation metrics: paper metrics (as the reference defines them) and standard MTL metrics.

Each family has three functions:

* ``*_init_stats(...) -> stats``: a dict of zero arrays (sufficient statistics);
* ``*_update_stats(stats, raw, batch, ...) -> stats``: jittable; adds one batch's statistics. Padded examples
  (``batch['weight'] == 0``) add nothing;
* ``*_finalize(stats, ...) -> {'<task>/<metric>': float}``: host side.

Stats are sums and counts (per-image IoU sums, confusion matrices, angle histograms), so stats of different
batches or devices add with ``jax.tree.map(jnp.add, a, b)`` and the result of a split does not depend on how it
was batched. The reference instead averaged per-batch values with ``drop_last=True`` (README "tasks").

Counts are int32: exact up to 2^31 pixels per split (about 32,000 images at 256x256). Sums of errors are float32.

Metric names say their family: ``*_paper`` are the paper's definitions; the rest are the standard definitions
used by MTAN/LibMTL-style tables. Angle statistics are shared by both families.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtl_sparse_jax.data.resize import resize_bilinear_torch, resize_nearest_torch
from mtl_sparse_jax.losses import (
    batch_key,
    depth_prediction_and_target,
    example_weights,
    l2_normalize,
    normals_valid_mask,
)

__all__ = [
    "ANGLE_BIN_DEG",
    "ANGLE_THRESHOLDS_DEG",
    "ATTRIBUTE_THRESHOLD_PAPER",
    "ATTRIBUTE_THRESHOLD_STANDARD",
    "add_stats",
    "delta_m",
    "attribute_init_stats",
    "attribute_update_stats",
    "attribute_finalize",
    "depth_init_stats",
    "depth_update_stats",
    "depth_finalize",
    "edge_init_stats",
    "edge_update_stats",
    "edge_finalize",
    "normals_init_stats",
    "normals_update_stats",
    "normals_finalize",
    "segmentation_init_stats",
    "segmentation_update_stats",
    "segmentation_finalize",
]

# The median angle is read off a histogram with this bin width (degrees); it is exact to +-ANGLE_BIN_DEG / 2.
ANGLE_BIN_DEG = 0.01
ANGLE_NUM_BINS = int(round(180.0 / ANGLE_BIN_DEG))
ANGLE_THRESHOLDS_DEG = (11.25, 22.5, 30.0, 45.0)
ATTRIBUTE_THRESHOLD_PAPER = 0.4
ATTRIBUTE_THRESHOLD_STANDARD = 0.5


def add_stats(a, b):
    """Sum of two stats pytrees (from different batches or devices)."""
    return jax.tree.map(jnp.add, a, b)


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(np.float64)


def _ratio(num, den) -> float:
    """num / den, NaN when nothing was counted (an empty split has no metric)."""
    return float(num / den) if den > 0 else float("nan")


def _pixel_weights(weight, spatial_shape):
    return jnp.broadcast_to(weight[:, None, None] > 0, (weight.shape[0],) + tuple(spatial_shape))


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


def segmentation_init_stats(num_classes: int, num_logits: int):
    return {
        "iou_paper_sum": jnp.zeros((), jnp.float32),
        "num_images": jnp.zeros((), jnp.int32),
        "confusion": jnp.zeros((num_classes, num_logits), jnp.int32),
    }


def segmentation_update_stats(stats, raw, batch, *, num_classes: int, ignore_label: int = 255, target_key="seg"):
    """Paper IoU at the logits' grid; confusion matrix at input resolution with logits upsampled bilinearly.

    Valid pixels have a label in [0, num_classes); everything else (255 in particular) is ignored.
    Predictions are the argmax over all logits, so a prediction of an extra logit (the reference's 41st NYU
    class) counts as wrong.
    """
    del ignore_label  # any label outside [0, num_classes) is ignored, 255 included
    raw = jnp.asarray(raw, jnp.float32)
    labels = jnp.asarray(batch_key(batch, target_key, target_key), jnp.int32)
    weight = example_weights(batch, raw.shape[0])
    num_logits = raw.shape[-1]

    # Paper: micro-imagewise IoU at feature resolution. Summed over classes, every wrong valid pixel is one fp
    # (its predicted class) and one fn (its true class), so IoU_img = correct / (2 * valid - correct).
    labels_small = resize_nearest_torch(labels, raw.shape[1:3])
    pred_small = jnp.argmax(raw, axis=-1)
    valid_small = (labels_small >= 0) & (labels_small < num_classes)
    correct = jnp.sum(valid_small & (pred_small == labels_small), axis=(1, 2)).astype(jnp.float32)
    valid_count = jnp.sum(valid_small, axis=(1, 2)).astype(jnp.float32)
    union = 2.0 * valid_count - correct
    iou_img = jnp.where(union > 0, correct / jnp.maximum(union, 1.0), 0.0)  # no valid pixel: IoU 0

    # Standard: confusion matrix at input resolution.
    pred_full = jnp.argmax(resize_bilinear_torch(raw, labels.shape[1:3]), axis=-1)
    valid_full = (labels >= 0) & (labels < num_classes) & _pixel_weights(weight, labels.shape[1:3])
    index = jnp.where(valid_full, labels * num_logits + pred_full, 0).reshape(-1)
    confusion = (
        jnp.zeros((num_classes * num_logits,), jnp.int32)
        .at[index]
        .add(valid_full.reshape(-1).astype(jnp.int32))
        .reshape(num_classes, num_logits)
    )
    return {
        "iou_paper_sum": stats["iou_paper_sum"] + jnp.sum(jnp.where(weight > 0, iou_img, 0.0)),
        "num_images": stats["num_images"] + jnp.sum(weight > 0).astype(jnp.int32),
        "confusion": stats["confusion"] + confusion,
    }


def segmentation_finalize(stats, *, prefix="seg"):
    """seg/iou_paper, seg/miou (mean over classes present in GT or prediction), seg/pixel_acc."""
    confusion = _host(stats["confusion"])
    num_classes = confusion.shape[0]
    true_positive = np.diag(confusion[:, :num_classes])
    union = confusion.sum(axis=1) + confusion[:, :num_classes].sum(axis=0) - true_positive
    present = union > 0
    miou = float(np.mean(true_positive[present] / union[present])) if present.any() else float("nan")
    return {
        f"{prefix}/iou_paper": _ratio(_host(stats["iou_paper_sum"]), _host(stats["num_images"])),
        f"{prefix}/miou": miou,
        f"{prefix}/pixel_acc": _ratio(true_positive.sum(), confusion.sum()),
    }


# ---------------------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------------------


def depth_init_stats():
    zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    return {
        "abs_sum_paper": zero_f,
        "sq_sum_paper": zero_f,
        "count_paper": zero_i,
        "abs_sum_m": zero_f,
        "rel_sum": zero_f,
        "count": zero_i,
    }


def depth_update_stats(stats, raw, batch, *, target_key="depth", valid_key="depth_valid", scale_key="depth_scale"):
    """Paper: MAE/MSE of sigmoid(raw) at the logits' grid, normalised units, over pixels whose downsampled
    target is finite and > 0 (the reference's mask). Standard: at input resolution (prediction upsampled
    bilinearly after the sigmoid), in metres (x depth_scale), over ``depth_valid`` pixels with target > 0."""
    raw = jnp.asarray(raw, jnp.float32)
    target = jnp.asarray(batch_key(batch, target_key, target_key), jnp.float32)
    weight = example_weights(batch, raw.shape[0])

    pred_small, target_small = depth_prediction_and_target(raw, target, "feature")
    mask_small = (
        jnp.isfinite(target_small[..., 0]) & (target_small[..., 0] > 0) & _pixel_weights(weight, raw.shape[1:3])
    )
    err_small = jnp.where(mask_small, pred_small[..., 0] - jnp.where(mask_small, target_small[..., 0], 0.0), 0.0)

    valid = jnp.asarray(batch_key(batch, valid_key, target_key), jnp.float32)[..., 0] > 0
    scale = jnp.asarray(batch_key(batch, scale_key, target_key), jnp.float32).reshape(-1)
    pred_full = resize_bilinear_torch(pred_small, target.shape[1:3])[..., 0]
    t = target[..., 0]
    mask_full = valid & jnp.isfinite(t) & (t > 0) & _pixel_weights(weight, t.shape[1:3])
    safe_t = jnp.where(mask_full, t, 1.0)
    abs_err = jnp.where(mask_full, jnp.abs(pred_full - safe_t), 0.0)
    return {
        "abs_sum_paper": stats["abs_sum_paper"] + jnp.sum(jnp.abs(err_small)),
        "sq_sum_paper": stats["sq_sum_paper"] + jnp.sum(err_small**2),
        "count_paper": stats["count_paper"] + jnp.sum(mask_small).astype(jnp.int32),
        "abs_sum_m": stats["abs_sum_m"] + jnp.sum(jnp.where(mask_full, abs_err * scale[:, None, None], 0.0)),
        "rel_sum": stats["rel_sum"] + jnp.sum(abs_err / safe_t),
        "count": stats["count"] + jnp.sum(mask_full).astype(jnp.int32),
    }


def depth_finalize(stats, *, prefix="depth"):
    """depth/mae_paper, depth/mse_paper (the reference's "rmse"), depth/abs_err_m, depth/rel_err."""
    s = {k: _host(v) for k, v in stats.items()}
    return {
        f"{prefix}/mae_paper": _ratio(s["abs_sum_paper"], s["count_paper"]),
        f"{prefix}/mse_paper": _ratio(s["sq_sum_paper"], s["count_paper"]),
        f"{prefix}/abs_err_m": _ratio(s["abs_sum_m"], s["count"]),
        f"{prefix}/rel_err": _ratio(s["rel_sum"], s["count"]),
    }


# ---------------------------------------------------------------------------------------------------------
# Surface normals
# ---------------------------------------------------------------------------------------------------------


def normals_init_stats():
    zero_f = jnp.zeros((), jnp.float32)
    return {
        "count": jnp.zeros((), jnp.int32),
        "cos_sum": zero_f,
        "angle_sum": zero_f,
        "angle_sq_sum": zero_f,
        "within": jnp.zeros((len(ANGLE_THRESHOLDS_DEG),), jnp.int32),
        "angle_hist": jnp.zeros((ANGLE_NUM_BINS,), jnp.int32),
    }


def normals_angles_deg(pred, target):
    """(cos, angle in degrees) between L2-normalised vectors.

    The angle uses atan2(|a x b|, a . b): equal to arccos(clip(cos)) mathematically, but accurate in float32
    near 0 degrees, where arccos loses about 0.02 degrees.
    """
    a, b = l2_normalize(pred), l2_normalize(target)
    cos = jnp.sum(a * b, axis=-1)
    sin = jnp.linalg.norm(jnp.cross(a, b), axis=-1)
    return cos, jnp.degrees(jnp.arctan2(sin, cos))


def normals_update_stats(stats, raw, batch, *, target_key="normals"):
    """At input resolution: tanh(raw) upsampled bilinearly, both L2-normalised, over valid GT pixels."""
    raw = jnp.asarray(raw, jnp.float32)
    target = jnp.asarray(batch_key(batch, target_key, target_key), jnp.float32)
    weight = example_weights(batch, raw.shape[0])
    pred = resize_bilinear_torch(jnp.tanh(raw), target.shape[1:3])
    valid = normals_valid_mask(target) & _pixel_weights(weight, target.shape[1:3])
    cos, angle = normals_angles_deg(pred, target)
    cos = jnp.where(valid, cos, 0.0)
    angle = jnp.where(valid, angle, 0.0)
    within = jnp.stack([jnp.sum(valid & (angle <= t)) for t in ANGLE_THRESHOLDS_DEG]).astype(jnp.int32)
    bins = jnp.clip(jnp.floor(angle / ANGLE_BIN_DEG).astype(jnp.int32), 0, ANGLE_NUM_BINS - 1)
    hist = jnp.zeros((ANGLE_NUM_BINS,), jnp.int32).at[bins.reshape(-1)].add(valid.reshape(-1).astype(jnp.int32))
    return {
        "count": stats["count"] + jnp.sum(valid).astype(jnp.int32),
        "cos_sum": stats["cos_sum"] + jnp.sum(cos),
        "angle_sum": stats["angle_sum"] + jnp.sum(angle),
        "angle_sq_sum": stats["angle_sq_sum"] + jnp.sum(angle**2),
        "within": stats["within"] + within,
        "angle_hist": stats["angle_hist"] + hist,
    }


def histogram_median(hist: np.ndarray, bin_width: float) -> float:
    """Median of the samples binned in ``hist``, each sample taken at its bin centre.

    For an even count the two middle order statistics are averaged, as np.median does.
    """
    n = int(hist.sum())
    if n == 0:
        return float("nan")
    cumulative = np.cumsum(hist)
    ranks = (n // 2, n // 2 + 1) if n % 2 == 0 else ((n + 1) // 2,)
    centres = [(np.searchsorted(cumulative, k) + 0.5) * bin_width for k in ranks]
    return float(np.mean(centres))


def normals_finalize(stats, *, prefix="normals"):
    """normals/cos_paper, angle_mean, angle_median, angle_rmse, pct_11.25, pct_22.5, pct_30, pct_45."""
    count = _host(stats["count"])
    within = _host(stats["within"])
    out = {
        f"{prefix}/cos_paper": _ratio(_host(stats["cos_sum"]), count),
        f"{prefix}/angle_mean": _ratio(_host(stats["angle_sum"]), count),
        f"{prefix}/angle_median": histogram_median(np.asarray(jax.device_get(stats["angle_hist"])), ANGLE_BIN_DEG),
        f"{prefix}/angle_rmse": float(np.sqrt(_ratio(_host(stats["angle_sq_sum"]), count))),
    }
    for threshold, n_within in zip(ANGLE_THRESHOLDS_DEG, within):
        out[f"{prefix}/pct_{threshold:g}"] = 100.0 * _ratio(n_within, count)
    return out


# ---------------------------------------------------------------------------------------------------------
# Edge (not in the paper; the reference's edge metric)
# ---------------------------------------------------------------------------------------------------------


def edge_init_stats():
    return {"abs_sum": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)}


def edge_update_stats(stats, raw, batch, *, target_key="edge"):
    """Mean |sigmoid(raw) - target| over pixels with target != 0, target nearest-downsampled to the logits' grid."""
    raw = jnp.asarray(raw, jnp.float32)
    target = jnp.asarray(batch_key(batch, target_key, target_key), jnp.float32)
    weight = example_weights(batch, raw.shape[0])
    target_small = resize_nearest_torch(target, raw.shape[1:3])[..., 0]
    pred = jax.nn.sigmoid(raw)[..., 0]
    mask = (target_small != 0) & _pixel_weights(weight, raw.shape[1:3])
    return {
        "abs_sum": stats["abs_sum"] + jnp.sum(jnp.where(mask, jnp.abs(pred - target_small), 0.0)),
        "count": stats["count"] + jnp.sum(mask).astype(jnp.int32),
    }


def edge_finalize(stats, *, prefix="edge"):
    return {f"{prefix}/mae_paper": _ratio(_host(stats["abs_sum"]), _host(stats["count"]))}


# ---------------------------------------------------------------------------------------------------------
# Binary attributes
# ---------------------------------------------------------------------------------------------------------


def attribute_init_stats():
    # confusion_paper[true, predicted] at threshold 0.4; correct_standard counts hits at 0.5.
    return {"confusion_paper": jnp.zeros((2, 2), jnp.int32), "correct_standard": jnp.zeros((), jnp.int32)}


def attribute_update_stats(stats, raw, batch, *, target_key):
    """Binarise sigmoid(raw) at 0.4 (paper) and 0.5 (standard)."""
    logits = jnp.asarray(raw, jnp.float32).reshape(-1)
    labels = jnp.asarray(batch_key(batch, target_key, target_key), jnp.float32).reshape(-1)
    real = example_weights(batch, logits.shape[0]) > 0
    prob = jax.nn.sigmoid(logits)
    truth = (labels > 0.5).astype(jnp.int32)
    pred_paper = (prob >= ATTRIBUTE_THRESHOLD_PAPER).astype(jnp.int32)
    pred_standard = (prob >= ATTRIBUTE_THRESHOLD_STANDARD).astype(jnp.int32)
    confusion = jnp.zeros((4,), jnp.int32).at[truth * 2 + pred_paper].add(real.astype(jnp.int32)).reshape(2, 2)
    return {
        "confusion_paper": stats["confusion_paper"] + confusion,
        "correct_standard": stats["correct_standard"] + jnp.sum(real & (pred_standard == truth)).astype(jnp.int32),
    }


def weighted_f1(confusion: np.ndarray) -> float:
    """Support-weighted F1 over classes 0 and 1 (sklearn ``average='weighted'``, zero_division 0)."""
    f1, support = [], []
    for c in (0, 1):
        tp = confusion[c, c]
        fp = confusion[1 - c, c]
        fn = confusion[c, 1 - c]
        f1.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0)
        support.append(tp + fn)
    total = sum(support)
    return float(sum(f * s for f, s in zip(f1, support)) / total) if total > 0 else float("nan")


def attribute_finalize(stats, *, prefix):
    """<attr>/acc_paper (threshold 0.4), <attr>/f1_weighted (threshold 0.4), <attr>/acc (threshold 0.5)."""
    confusion = _host(stats["confusion_paper"])
    n = confusion.sum()
    return {
        f"{prefix}/acc_paper": _ratio(np.trace(confusion), n),
        f"{prefix}/f1_weighted": weighted_f1(confusion),
        f"{prefix}/acc": _ratio(_host(stats["correct_standard"]), n),
    }


# ---------------------------------------------------------------------------------------------------------
# Multi-task Delta_m
# ---------------------------------------------------------------------------------------------------------


def delta_m(mtl: Mapping[str, float], stl: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Delta_m (%) of a multi-task model against single-task baselines (Maninis et al. 2019; Vandenhende et al.).

    Delta_m = 100 / K * sum_k (-1)^{l_k} (M_mtl,k - M_stl,k) / M_stl,k, with l_k = 1 when lower is better, over
    the K metrics named in ``higher_is_better``. Positive means the multi-task model is better on average.
    """
    names = list(higher_is_better)
    if not names:
        raise ValueError("delta_m: higher_is_better names no metric; pass {metric_name: bool} for the metrics to use")
    missing = [k for k in names if k not in mtl or k not in stl]
    if missing:
        raise ValueError(f"delta_m: metrics {missing} are missing from the multi-task or single-task results")
    total = 0.0
    for k in names:
        base = float(stl[k])
        if base == 0.0:
            raise ValueError(f"delta_m: the single-task value of {k!r} is 0, so the relative change is undefined")
        sign = 1.0 if higher_is_better[k] else -1.0
        total += sign * (float(mtl[k]) - base) / base
    return 100.0 * total / len(names)
