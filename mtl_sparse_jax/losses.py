"""Per-task losses, as the reference computes them, and the loss combiners.

Every per-task loss is returned as a pair ``(numerator, denominator)`` of jittable float32 scalars, with the
loss being ``numerator / denominator``. Padded examples (``batch['weight'] == 0``) contribute to neither, so
summing the pairs over batches and dividing once gives the loss of a whole split, independent of the batch
size. The denominator is always a count (pixels or examples); `loss_from_terms` divides by ``max(den, 1)``
so an empty selection (e.g. no valid normals) gives 0 instead of NaN.

Reference semantics reproduced (see docs and the README "tasks" section):

* segmentation: label-smoothed (0.1) cross-entropy with ignore label 255; ignored pixels contribute 0 but
  count in the denominator (all non-padded pixels), with ``C`` = number of logits (smp's
  ``SoftCrossEntropyLoss``)::

      L = 0.9 * (1/N) sum_p v_p (-log p_{y_p}) + (0.1 / C) * (1/N) sum_p v_p (-sum_c log p_c)

* depth: MSE between ``sigmoid(raw)`` and the target, both multiplied by the reference's mask (target finite
  and > 0) and averaged over all non-padded pixels;
* normals: mean over valid pixels (target not all-zero) of ``1 - cos``; the prediction goes through tanh and
  both vectors are L2-normalised (eps 1e-12);
* edge: Huber (delta 0.2) between ``sigmoid(raw)`` and the target, mean over all non-padded pixels;
* attributes: binary cross-entropy with logits, one sigmoid. ``double_sigmoid=True`` reproduces the
  reference, which fed the head's sigmoid probability into ``BCEWithLogitsLoss``.

Combiners (``combine_losses``): ``'uncertainty'`` (paper Eq. 2 with trainable log-variances),
``'uncertainty_reference'`` (what the reference code computes: ``exp(-s) L + s`` with s fixed at 1; the
reference created its log-variances but never gave them to an optimizer), ``'sum'`` and ``'fixed'``.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mtl_sparse_jax.data.resize import resize_bilinear_torch, resize_nearest_torch

__all__ = [
    "LOSS_COMBINERS",
    "LOSS_RESOLUTIONS",
    "REFERENCE_LOG_VAR",
    "attribute_loss_terms",
    "combine_losses",
    "depth_loss_terms",
    "edge_loss_terms",
    "init_loss_weights",
    "loss_from_terms",
    "normals_loss_terms",
    "segmentation_loss_terms",
    "weighted_pixel_count",
]

LOSS_RESOLUTIONS = ("feature", "input")
LOSS_COMBINERS = ("uncertainty", "uncertainty_reference", "sum", "fixed")
# The reference initialised its log-variances with torch.ones and never handed them to an optimizer.
REFERENCE_LOG_VAR = 1.0
# L2-normalisation eps of torch.nn.functional.normalize, as used by the reference for normals.
NORMALIZE_EPS = 1e-12


def loss_from_terms(numerator, denominator):
    """``numerator / denominator`` with an empty selection (denominator 0, a count) giving 0."""
    return numerator / jnp.maximum(denominator, 1.0)


def batch_key(batch: Mapping, key: str, task: str):
    """``batch[key]``, or a one-line error naming the missing key and the task that needs it."""
    if key not in batch:
        raise KeyError(
            f"batch has no key {key!r}, needed by task {task!r}; the input pipeline must emit it "
            f"(batch keys present: {sorted(batch)})"
        )
    return batch[key]


def example_weights(batch: Mapping, batch_size: int):
    """Per-example weights [B] (1 real, 0 padding); all ones when the batch carries no ``weight``."""
    if "weight" not in batch:
        return jnp.ones((batch_size,), jnp.float32)
    weight = jnp.asarray(batch["weight"], jnp.float32)
    if weight.shape != (batch_size,):
        raise ValueError(f"batch['weight'] must have shape ({batch_size},), got {tuple(weight.shape)}")
    return weight


def _pixel_weights(weight, spatial_shape):
    """Broadcast per-example weights [B] to [B, h, w]."""
    return jnp.broadcast_to(weight[:, None, None], (weight.shape[0],) + tuple(spatial_shape))


def _masked_sum(mask, weights, values):
    """sum(weights * values) over ``mask``; `where`, not a product, so garbage (inf/NaN) in padding or in
    ignored pixels cannot leak into the sum."""
    return jnp.sum(jnp.where(mask & (weights > 0), weights * jnp.where(mask, values, 0.0), 0.0))


def weighted_pixel_count(weight, spatial_shape):
    """Number of non-padded pixels: sum_b weight_b * h * w."""
    return jnp.sum(weight) * float(spatial_shape[0] * spatial_shape[1])


def _check_dense_raw(raw, task: str, channels: int | None = None):
    if raw.ndim != 4 or (channels is not None and raw.shape[-1] != channels):
        want = f"[B,h,w,{channels}]" if channels is not None else "[B,h,w,C]"
        raise ValueError(f"raw output of task {task!r} must have shape {want}, got {tuple(raw.shape)}")
    return jnp.asarray(raw, jnp.float32)


def _check_target(target, raw, key: str, channels: int | None):
    want_ndim = 3 if channels is None else 4
    if (
        target.ndim != want_ndim
        or target.shape[0] != raw.shape[0]
        or (channels is not None and target.shape[-1] != channels)
    ):
        want = "[B,H,W]" if channels is None else f"[B,H,W,{channels}]"
        raise ValueError(
            f"batch[{key!r}] must have shape {want} with B = {raw.shape[0]} (the model's batch), "
            f"got {tuple(target.shape)}"
        )


def _check_resolution(loss_resolution: str):
    if loss_resolution not in LOSS_RESOLUTIONS:
        raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, got {loss_resolution!r}")


def segmentation_log_probs_and_labels(raw, labels, loss_resolution: str):
    """Log-softmax [B,h,w,C] and labels [B,h,w] on the grid the loss is computed on.

    'feature': labels nearest-downsampled to the logits' grid (pixel (8i, 8j) for stride 8), as the reference.
    'input': logits bilinearly upsampled to the labels' size.
    """
    _check_resolution(loss_resolution)
    if loss_resolution == "feature":
        labels = resize_nearest_torch(labels, raw.shape[1:3])
    else:
        raw = resize_bilinear_torch(raw, labels.shape[1:3])
    return jax.nn.log_softmax(raw, axis=-1), labels


def segmentation_loss_terms(
    raw, batch, *, label_smoothing=0.1, ignore_label=255, loss_resolution="feature", task="seg", target_key="seg"
):
    """Label-smoothed CE with ignore label; denominator = all non-padded pixels, ignored ones included."""
    raw = _check_dense_raw(raw, task)
    labels = jnp.asarray(batch_key(batch, target_key, task), jnp.int32)
    _check_target(labels, raw, target_key, None)
    weight = example_weights(batch, raw.shape[0])
    log_probs, labels = segmentation_log_probs_and_labels(raw, labels, loss_resolution)
    num_logits = log_probs.shape[-1]
    # Labels outside [0, num_logits) (the ignore label, or garbage in padding) are ignored.
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_logits)
    safe_labels = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    smooth = -jnp.sum(log_probs, axis=-1)
    per_pixel = (1.0 - label_smoothing) * nll + (label_smoothing / num_logits) * smooth
    numerator = _masked_sum(valid, _pixel_weights(weight, labels.shape[1:3]), per_pixel)
    return numerator, weighted_pixel_count(weight, labels.shape[1:3])


def depth_prediction_and_target(raw, target, loss_resolution: str):
    """sigmoid prediction and target on the loss grid ('feature': target bilinear-downsampled, half-pixel)."""
    _check_resolution(loss_resolution)
    if loss_resolution == "feature":
        target = resize_bilinear_torch(target, raw.shape[1:3])
    else:
        raw = resize_bilinear_torch(raw, target.shape[1:3])
    return jax.nn.sigmoid(raw), target


def depth_loss_terms(raw, batch, *, loss_resolution="feature", task="depth", target_key="depth"):
    """MSE of sigmoid(raw) vs target, both zeroed where the target is not finite and > 0; all-pixel mean."""
    raw = _check_dense_raw(raw, task, 1)
    target = jnp.asarray(batch_key(batch, target_key, task), jnp.float32)
    _check_target(target, raw, target_key, 1)
    weight = example_weights(batch, raw.shape[0])
    pred, target = depth_prediction_and_target(raw, target, loss_resolution)
    # The reference multiplies prediction and target by this mask and then takes a plain mean, so masked
    # pixels contribute 0 but still count in the denominator.
    mask = (jnp.isfinite(target) & (target > 0))[..., 0]
    diff = pred[..., 0] - jnp.where(mask, target[..., 0], 0.0)
    numerator = _masked_sum(mask, _pixel_weights(weight, mask.shape[1:3]), diff**2)
    return numerator, weighted_pixel_count(weight, mask.shape[1:3])


def l2_normalize(v, eps=NORMALIZE_EPS):
    """v / (||v|| + eps) along the last axis, as the reference normalises normals."""
    return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + eps)


def normals_valid_mask(target):
    """Valid normals: ground truth not all-zero ((0,0,0) marks invalid pixels)."""
    return jnp.any(target != 0, axis=-1)


def normals_prediction_and_target(raw, target, loss_resolution: str):
    """tanh prediction and target on the loss grid ('feature': target nearest-downsampled)."""
    _check_resolution(loss_resolution)
    if loss_resolution == "feature":
        target = resize_nearest_torch(target, raw.shape[1:3])
    else:
        raw = resize_bilinear_torch(raw, target.shape[1:3])
    return jnp.tanh(raw), target


def normals_loss_terms(raw, batch, *, loss_resolution="feature", task="normals", target_key="normals"):
    """Mean over valid pixels of 1 - cos(pred, target), both L2-normalised; the mean is over the batch's pixels."""
    raw = _check_dense_raw(raw, task, 3)
    target = jnp.asarray(batch_key(batch, target_key, task), jnp.float32)
    _check_target(target, raw, target_key, 3)
    weight = example_weights(batch, raw.shape[0])
    pred, target = normals_prediction_and_target(raw, target, loss_resolution)
    valid = normals_valid_mask(target)
    pixel_weights = _pixel_weights(weight, target.shape[1:3])
    cos = jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)
    return _masked_sum(valid, pixel_weights, 1.0 - cos), _masked_sum(valid, pixel_weights, jnp.ones_like(cos))


def huber(x, delta):
    """Elementwise Huber: 0.5 x^2 for |x| < delta, else delta (|x| - 0.5 delta) (torch.nn.HuberLoss)."""
    abs_x = jnp.abs(x)
    return jnp.where(abs_x < delta, 0.5 * x**2, delta * (abs_x - 0.5 * delta))


def edge_prediction_and_target(raw, target, loss_resolution: str):
    """sigmoid prediction and target on the loss grid ('feature': target nearest-downsampled)."""
    _check_resolution(loss_resolution)
    if loss_resolution == "feature":
        target = resize_nearest_torch(target, raw.shape[1:3])
    else:
        raw = resize_bilinear_torch(raw, target.shape[1:3])
    return jax.nn.sigmoid(raw), target


def edge_loss_terms(raw, batch, *, delta=0.2, loss_resolution="feature", task="edge", target_key="edge"):
    """Huber(delta) of sigmoid(raw) vs target, mean over all non-padded pixels."""
    raw = _check_dense_raw(raw, task, 1)
    target = jnp.asarray(batch_key(batch, target_key, task), jnp.float32)
    _check_target(target, raw, target_key, 1)
    weight = example_weights(batch, raw.shape[0])
    pred, target = edge_prediction_and_target(raw, target, loss_resolution)
    per_pixel = huber(pred - target, delta)[..., 0]
    everywhere = jnp.ones(per_pixel.shape, bool)
    numerator = _masked_sum(everywhere, _pixel_weights(weight, per_pixel.shape[1:3]), per_pixel)
    return numerator, weighted_pixel_count(weight, per_pixel.shape[1:3])


def binary_cross_entropy_with_logits(logits, labels):
    """-[y log sigmoid(z) + (1-y) log(1 - sigmoid(z))] = softplus(z) - y z, computed stably."""
    return jax.nn.softplus(logits) - labels * logits


def attribute_loss_terms(raw, batch, *, double_sigmoid=False, task="male", target_key=None):
    """BCE with logits, mean over non-padded examples. ``double_sigmoid`` feeds sigmoid(raw) as the logit."""
    target_key = target_key or task
    logits = jnp.asarray(raw, jnp.float32)
    if logits.ndim == 2 and logits.shape[-1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(f"raw output of task {task!r} must be a logit of shape [B], got {tuple(raw.shape)}")
    labels = jnp.asarray(batch_key(batch, target_key, task), jnp.float32)
    if labels.shape != logits.shape:
        raise ValueError(f"batch[{target_key!r}] must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    weight = example_weights(batch, logits.shape[0])
    if double_sigmoid:
        logits = jax.nn.sigmoid(logits)
    everywhere = jnp.ones(logits.shape, bool)
    return _masked_sum(everywhere, weight, binary_cross_entropy_with_logits(logits, labels)), jnp.sum(weight)


# ---------------------------------------------------------------------------------------------------------
# Loss combiners
# ---------------------------------------------------------------------------------------------------------


def _check_kind(kind: str):
    if kind not in LOSS_COMBINERS:
        raise ValueError(f"unknown loss combiner {kind!r}; known: {', '.join(LOSS_COMBINERS)}")


def init_loss_weights(kind: str, task_names):
    """Initial trainable loss-combiner parameters (the train state's ``loss_weights``).

    'uncertainty': ``{task: s}`` with s = log sigma^2 = 0 (sigma = 1). 'uncertainty_reference': ``{task: 1.0}``,
    kept for logging only (combine_losses uses the constant 1, as the reference never trained them).
    'sum' and 'fixed': ``{}`` (nothing to train).
    """
    _check_kind(kind)
    if kind == "uncertainty":
        return {t: jnp.zeros((), jnp.float32) for t in task_names}
    if kind == "uncertainty_reference":
        return {t: jnp.full((), REFERENCE_LOG_VAR, jnp.float32) for t in task_names}
    return {}


def combine_losses(kind: str, task_losses: Mapping, loss_weights=None, *, active=None, fixed_weights=None):
    """Total loss from per-task losses ``{task: scalar}``.

    * 'uncertainty': sum_t 0.5 exp(-s_t) L_t + 0.5 s_t, with s_t = log sigma_t^2 from ``loss_weights`` (paper
      Eq. 2: L_t / (2 sigma_t^2) + log sigma_t). d total / d s_t = 0.5 - 0.5 exp(-s_t) L_t.
    * 'uncertainty_reference': sum_t exp(-1) L_t + 1, the reference's exp(-s) L + s with s fixed at 1; any
      ``loss_weights`` passed are ignored and get zero gradient, so the optimizer cannot move the weighting.
    * 'sum': sum_t L_t.
    * 'fixed': sum_t w_t L_t with ``fixed_weights`` = ``{task: w_t}``.

    ``active``: optional ``{task: 0/1}`` (arrays or floats). A task with flag 0 (stopped early) is dropped
    from the total, as the reference does; its loss can still be logged by the caller.
    """
    _check_kind(kind)
    tasks = list(task_losses)
    active = {} if active is None else active
    unknown = sorted(set(active) - set(tasks))
    if unknown:
        raise ValueError(f"active flags given for tasks without a loss: {unknown}; tasks with a loss: {tasks}")
    if kind == "uncertainty":
        missing = [t for t in tasks if loss_weights is None or t not in loss_weights]
        if missing:
            raise ValueError(
                f"'uncertainty' needs a log-variance per task in loss_weights; missing {missing} "
                f"(create them with init_loss_weights('uncertainty', tasks))"
            )
    if kind == "fixed":
        missing = [t for t in tasks if fixed_weights is None or t not in fixed_weights]
        if missing:
            raise ValueError(f"'fixed' needs fixed_weights for every task; missing {missing}")
    total = jnp.zeros((), jnp.float32)
    for t in tasks:
        loss = jnp.asarray(task_losses[t], jnp.float32)
        if kind == "uncertainty":
            s = jnp.asarray(loss_weights[t], jnp.float32)
            term = 0.5 * jnp.exp(-s) * loss + 0.5 * s
        elif kind == "uncertainty_reference":
            term = jnp.exp(-REFERENCE_LOG_VAR) * loss + REFERENCE_LOG_VAR
        elif kind == "sum":
            term = loss
        else:
            term = jnp.asarray(fixed_weights[t], jnp.float32) * loss
        flag = jnp.asarray(active.get(t, 1.0), jnp.float32)
        # where, not multiply: a stopped task must not bring a NaN/inf loss into the total.
        total = total + jnp.where(flag > 0, flag * term, 0.0)
    return total
