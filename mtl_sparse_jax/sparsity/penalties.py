"""Penalty values R(θ), for logging the full objective or adding to a loss.

Both are differentiable, with a zero (not NaN) gradient at an all-zero group, so they can be added to the loss
(the reference back-propagates its penalty term; reference §3.4).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from mtl_sparse_jax.sparsity import groups as groups_lib
from mtl_sparse_jax.sparsity import prox as prox_lib

WEIGHTINGS = ("group_size", "num_groups", "none")


def _group_weight(shape, axis, weighting):
    if weighting == "group_size":
        return math.sqrt(groups_lib.group_size(shape, axis))
    if weighting == "num_groups":
        return math.sqrt(groups_lib.num_groups(shape, axis))
    if weighting == "none":
        return 1.0
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def group_lasso_penalty(params, group_axes, lam, weighting: str = "group_size"):
    """λ Σ_leaves w_leaf Σ_g ‖θ_g‖₂ over the grouped leaves, as a float32 scalar.

    ``weighting='group_size'``: w = √n_g, the paper's R(θ) = λ Σ_g √n_g ‖θ_g‖ (the prox's penalty).
    ``weighting='num_groups'``: w = √(number of groups) = √C_in for an HWIO kernel, the reference code's in-loss
    term λ Σ_layers √C_in Σ_c ‖W_c‖ (its §3.4). ``weighting='none'``: w = 1.
    """
    total = jnp.zeros([], jnp.float32)
    for _, leaf, axis in groups_lib.flatten_grouped(params, group_axes):
        w = _group_weight(leaf.shape, axis, weighting)
        total = total + w * jnp.sum(prox_lib.safe_group_norms(leaf, axis=axis)).astype(jnp.float32)
    return jnp.asarray(lam, jnp.float32) * total


def group_mcp_penalty(params, group_axes, lam, gamma, weighting: str = "group_size"):
    """Σ_g P(‖θ_g‖) with the MCP P(t) = λ_g t − t²/(2γ) for t ≤ γλ_g, else γλ_g²/2; λ_g = λ·w as above."""
    total = jnp.zeros([], jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    for _, leaf, axis in groups_lib.flatten_grouped(params, group_axes):
        lam_g = jnp.asarray(lam, jnp.float32) * _group_weight(leaf.shape, axis, weighting)
        t = prox_lib.safe_group_norms(leaf, axis=axis).astype(jnp.float32)
        p = jnp.where(t <= gamma * lam_g, lam_g * t - t * t / (2 * gamma), 0.5 * gamma * lam_g**2)
        total = total + jnp.sum(p)
    return total
