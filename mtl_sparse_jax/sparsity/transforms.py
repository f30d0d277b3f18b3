"""Proximal optimizers as optax ``GradientTransformation``s.

* :func:`prox_adamw`: the proximal AdamW the paper ran (HF-style AdamW, then the Adam-weighted group prox on the
  grouped leaves). It owns the Adam state because the adaptive prox needs Adam's denominator.
* :func:`group_lasso_prox`: a prox step to put last in any ``optax.chain``; it rewrites the updates u into
  prox(θ + u) − θ, the pattern of ``optax.keep_params_nonnegative``.

``learning_rate`` and ``lam`` accept floats, jnp scalars (traced values too) or optax schedules (called with the
step count, 0 first). Both factories work under ``optax.inject_hyperparams`` with
``static_args=('group_axes', 'b1', 'b2')``, which lets λ and the learning rate change at runtime without
recompiling (β1, β2 static keep 1 − β in double precision). Updates are differentiable in the params, the
gradients, λ and the learning rate (the adaptive prox's Newton loop is differentiated implicitly), so λ can be
learned through an update.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_sparse_jax.sparsity import groups as groups_lib
from mtl_sparse_jax.sparsity import prox as prox_lib

PROX_ADAMW_MODES = ("adaptive", "euclidean", "l1", "none")
CHAIN_PROX_MODES = ("group", "l1", "mcp")


class ProxAdamWState(NamedTuple):
    count: jax.Array  # int32 [], number of updates done
    mu: optax.Updates  # first moment, float32, shapes of the params
    nu: optax.Updates  # second moment, float32, shapes of the params


class GroupLassoProxState(NamedTuple):
    count: jax.Array  # int32 [], drives schedules


def _value_at(v, count):
    """A hyperparameter's value at step ``count``: schedules are called, numbers pass through, as float32
    (float64 when the value is float64, so that λ can be differentiated in double precision)."""
    v = jnp.asarray(v(count) if callable(v) else v)
    return v.astype(jnp.promote_types(v.dtype, jnp.float32))


def _compute_dtype(x):
    """float32, or float64 for float64 leaves."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _sqrt_zero_safe(v):
    """√v with derivative 0 (not inf) at v = 0. The forward value is the same; the derivative matters when an
    update is differentiated (learned λ) and a gradient element is exactly zero, where 0·∞ would give NaN."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _one_minus(b):
    """1 − b in float32, subtracting in double precision when b is a Python number.

    1 − float32(0.999) is off by 1.3e-5 relative, which would put that error into every second moment and bias
    correction; the reference (PyTorch) subtracts in Python floats.
    """
    if isinstance(b, (int, float)):
        return jnp.asarray(1.0 - b, jnp.float32)
    return 1.0 - jnp.asarray(b, jnp.float32)


def _bias_correction(one_minus_b, t):
    """1 − b^t = −expm1(t·log1p(−(1 − b))), accurate for b close to 1."""
    return -jnp.expm1(t * jnp.log1p(-one_minus_b))


def _require_params(params, name):
    if params is None:
        raise ValueError(f"{name}.update needs the params: call update(updates, state, params).")


def prox_adamw(
    learning_rate,
    lam,
    group_axes,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    weight_decay=0.0,
    prox: str = "adaptive",
    max_iter: int = 100,
    tol: float = 1e-7,
) -> optax.GradientTransformation:
    """Proximal AdamW, exactly as the reference runs it (reference §4.4–4.5).

    For every leaf p with gradient g, at step t = 1, 2, …::

        m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²        d = √v + ε      (v not bias-corrected)
        p ← p − α_t · m / d         α_t = lr · √(1−β2^t) / (1−β1^t)
        p ← p − lr · wd · p         (decoupled weight decay, every leaf, after the step)
        grouped leaves only:  p ← prox(p),  τ_g = lr · λ · √n_g   (base lr, not α_t)

    ``prox`` chooses the last line: ``'adaptive'`` (default, the reference) is the exact minimiser of
    ½ Σ d_i (z_i − p_i)² + τ_g Σ_g ‖z_g‖ (:func:`prox_group_l2_weighted`); ``'euclidean'`` is block
    soft-thresholding with the same τ_g (the paper's Eq. 5, :func:`prox_group_l2`); ``'l1'`` is the Adam-weighted
    unstructured l1 prox with τ = lr·λ per element (for the paper's Table 3 comparison); ``'none'`` skips it.
    λ = 0 gives plain HF-AdamW, the dense baseline of this optimizer.

    Fixed points (derived): with the same d in the step and in the prox, and α_t → lr as t grows, a fixed
    point of the adaptive variant with weight_decay = 0 satisfies 0 ∈ ∇f(θ) + λ ∂R(θ),
    R = Σ_g √n_g ‖θ_g‖: it is a minimiser of the paper's objective f + λR whatever d is (a variable-metric
    proximal gradient method). The Euclidean variant's fixed points satisfy 0 ∈ D⁻¹∇f(θ) + λ ∂R(θ) instead,
    which is not the group-lasso optimality condition unless d is constant.

    Args:
      learning_rate: base lr (float, scalar array or schedule of the step count).
      lam: λ (same kinds).
      group_axes: pytree like the params with an int group axis or None per leaf, or a callable
        params -> such a pytree (e.g. :func:`default_group_axes`).
      b1, b2, eps, weight_decay: AdamW hyperparameters (defaults of the reference, wd 0).
      prox: 'adaptive' | 'euclidean' | 'l1' | 'none'.
      max_iter, tol: Newton budget of the adaptive prox.

    Returns:
      An ``optax.GradientTransformation``; ``update(grads, state, params)`` needs the params. Updates have the
      params' dtypes; the moments are float32 (float64 for float64 params).
    """
    if prox not in PROX_ADAMW_MODES:
        raise ValueError(f"prox must be one of {PROX_ADAMW_MODES}, got {prox!r}")

    def init_fn(params):
        groups_lib.resolve_group_axes(group_axes, params)  # fail early on a mismatched tree
        zeros = lambda p: jnp.zeros(jnp.shape(p), _compute_dtype(p))
        return ProxAdamWState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree_util.tree_map(zeros, params),
            nu=jax.tree_util.tree_map(zeros, params),
        )

    def update_fn(grads, state, params=None):
        _require_params(params, "prox_adamw")
        axes = groups_lib.resolve_group_axes(group_axes, params)
        lr = _value_at(learning_rate, state.count)
        lam_t = _value_at(lam, state.count)
        c1, c2 = _one_minus(b1), _one_minus(b2)
        beta1, beta2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
        eps_, wd = jnp.asarray(eps, jnp.float32), jnp.asarray(weight_decay, jnp.float32)

        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        alpha = lr * jnp.sqrt(_bias_correction(c2, t)) / _bias_correction(c1, t)

        mu = jax.tree_util.tree_map(lambda m, g: beta1 * m + c1 * g.astype(m.dtype), state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: beta2 * v + c2 * jnp.square(g.astype(v.dtype)), state.nu, grads)

        def leaf_update(axis, p, m, v):
            p32 = jnp.asarray(p).astype(_compute_dtype(p))
            d = _sqrt_zero_safe(v) + eps_
            new = p32 - alpha * m / d
            new = new - lr * wd * new
            if axis is not None and prox != "none":
                if prox == "l1":
                    new = prox_lib.prox_l1(new, lr * lam_t, d)
                else:
                    tau = lr * lam_t * math.sqrt(groups_lib.group_size(p.shape, axis))
                    if prox == "adaptive":
                        new = prox_lib.prox_group_l2_weighted(new, d, tau, axis=axis, max_iter=max_iter, tol=tol)
                    else:
                        new = prox_lib.prox_group_l2(new, tau, axis=axis)
            return (new - p32).astype(jnp.result_type(p))

        updates = groups_lib.map_with_axes(leaf_update, axes, params, mu, nu)
        return updates, ProxAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def group_lasso_prox(
    learning_rate, lam, group_axes, *, mode: str = "group", gamma=None
) -> optax.GradientTransformation:
    """A proximal step to chain last after any optax optimizer: updates u become prox(θ + u) − θ.

    ``mode='group'``: Euclidean group prox (block soft-thresholding) with τ_g = lr·λ·√n_g, the paper's Eq. 5.
    ``mode='l1'``: soft-thresholding of every element of the grouped leaves with τ = lr·λ.
    ``mode='mcp'``: group MCP (firm thresholding), :func:`prox_group_mcp` with λ_g = λ·√n_g, ``gamma`` and
    step = lr (needs gamma > lr): zero below lr·λ_g, unchanged above gamma·λ_g.

    Leaves whose group axis is None pass through. ``lr`` should be the base learning rate of the optimizer in
    front: chained after ``optax.sgd(lr)`` this is proximal gradient descent (ISTA) on f + λ Σ_g √n_g ‖θ_g‖.
    After an adaptive optimizer (``optax.adam``) the threshold ignores the preconditioner, so its fixed points
    are not the group-lasso minimisers in general; :func:`prox_adamw` is the consistent alternative.
    """
    if mode not in CHAIN_PROX_MODES:
        raise ValueError(f"mode must be one of {CHAIN_PROX_MODES}, got {mode!r}")
    if mode == "mcp" and gamma is None:
        raise ValueError("mode='mcp' needs gamma")

    def init_fn(params):
        groups_lib.resolve_group_axes(group_axes, params)
        return GroupLassoProxState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        _require_params(params, "group_lasso_prox")
        axes = groups_lib.resolve_group_axes(group_axes, params)
        lr = _value_at(learning_rate, state.count)
        lam_t = _value_at(lam, state.count)

        def leaf_update(axis, u, p):
            if axis is None:
                return u
            p32 = jnp.asarray(p).astype(_compute_dtype(p))
            x = p32 + jnp.asarray(u).astype(p32.dtype)
            if mode == "l1":
                z = prox_lib.prox_l1(x, lr * lam_t)
            else:
                sqrt_n = math.sqrt(groups_lib.group_size(p.shape, axis))
                if mode == "group":
                    z = prox_lib.prox_group_l2(x, lr * lam_t * sqrt_n, axis=axis)
                else:
                    z = prox_lib.prox_group_mcp(x, lam_t * sqrt_n, gamma, axis=axis, step=lr)
            return (z - p32).astype(jnp.result_type(u))

        new_updates = groups_lib.map_with_axes(leaf_update, axes, updates, params)
        return new_updates, GroupLassoProxState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
