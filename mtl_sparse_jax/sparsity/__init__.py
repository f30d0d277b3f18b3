"""Channel-group sparsity for any JAX/optax project: groups, proximal operators, optax transforms, statistics.

The method of "Less is More" (Upadhyay et al. 2023) is one step applied after every Adam update: the proximal
map of the channel-wise group lasso R(θ) = λ Σ_g √n_g ‖θ_g‖₂ on the backbone's conv kernels. This package
imports only jax, optax and numpy; it knows nothing about this project's models or data.

    from mtl_sparse_jax import sparsity
    tx = sparsity.prox_adamw(1e-4, 1e-5, sparsity.default_group_axes, weight_decay=0.1)
"""

from mtl_sparse_jax.sparsity.groups import (
    DEFAULT_RULES,
    default_group_axes,
    flatten_grouped,
    forward_order_key,
    group_axes_by_regex,
    group_size,
    num_groups,
    path_str,
    resolve_group_axes,
)
from mtl_sparse_jax.sparsity.penalties import group_lasso_penalty, group_mcp_penalty
from mtl_sparse_jax.sparsity.prox import (
    group_norms,
    prox_group_l2,
    prox_group_l2_weighted,
    prox_group_mcp,
    prox_l1,
    safe_group_norms,
)
from mtl_sparse_jax.sparsity.stats import order_layers, sparsity_counts, stats, zero_group_mask
from mtl_sparse_jax.sparsity.transforms import (
    GroupLassoProxState,
    ProxAdamWState,
    group_lasso_prox,
    prox_adamw,
)

__all__ = [
    "DEFAULT_RULES",
    "default_group_axes",
    "flatten_grouped",
    "forward_order_key",
    "group_axes_by_regex",
    "group_size",
    "num_groups",
    "path_str",
    "resolve_group_axes",
    "group_lasso_penalty",
    "group_mcp_penalty",
    "group_norms",
    "prox_group_l2",
    "prox_group_l2_weighted",
    "prox_group_mcp",
    "prox_l1",
    "safe_group_norms",
    "order_layers",
    "sparsity_counts",
    "stats",
    "zero_group_mask",
    "GroupLassoProxState",
    "ProxAdamWState",
    "group_lasso_prox",
    "prox_adamw",
]
