"""Sparsity statistics counted on the axis the prox zeros.

:func:`sparsity_counts` is the jittable core (per-leaf integer counts as one array, one device→host copy);
:func:`stats` turns them into percentages and a per-layer table in forward order on the host.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_sparse_jax.sparsity import groups as groups_lib

# Columns of the counts array, one row per grouped leaf.
COUNT_COLUMNS = ("zero_groups", "zero_params", "zero_output_filters")


def _others(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def zero_group_mask(x, axis: int):
    """[num groups] bool: group c of `x` (the slice `x.take(c, axis)`) is exactly zero. The one definition of a
    zero group that every counter of the project uses (not a norm test, which underflows)."""
    return jnp.all(jnp.asarray(x) == 0, axis=_others(jnp.ndim(x), axis))


def _leaf_counts(x, axis: int, output_axis: int):
    zero_groups = jnp.sum(zero_group_mask(x, axis))
    zero_params = jnp.sum(x == 0)
    zero_out = jnp.sum(zero_group_mask(x, output_axis))
    return jnp.stack([zero_groups, zero_params, zero_out]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _counts_core(leaves, axes, output_axis):
    if not leaves:
        return jnp.zeros((0, len(COUNT_COLUMNS)), jnp.int32)
    return jnp.stack([_leaf_counts(x, a, output_axis) for x, a in zip(leaves, axes)])


def sparsity_counts(params, group_axes, output_axis: int = -1):
    """Per grouped leaf (in tree-flattening order): [zero groups, zero params, all-zero output filters], int32.

    A group counts as zero when every element is exactly 0 (not by its norm, which underflows). Output filters
    are the slices along ``output_axis`` (the last axis, O of HWIO). Jittable: returns a [num_leaves, 3] array.
    """
    flat = groups_lib.flatten_grouped(params, group_axes)
    return _counts_core([leaf for _, leaf, _ in flat], tuple(a for _, _, a in flat), output_axis)


def order_layers(paths: Sequence[str], layer_order: Sequence[str] | None = None) -> list[str]:
    """Forward order of layer paths: ``layer_order`` first (as given), the rest by :func:`forward_order_key`."""
    if layer_order is None:
        return sorted(paths, key=groups_lib.forward_order_key)
    known = set(paths)
    unknown = [p for p in layer_order if p not in known]
    if unknown:
        raise ValueError(f"layer_order names paths that are not grouped leaves: {unknown[:3]}")
    listed = set(layer_order)
    return list(layer_order) + sorted((p for p in paths if p not in listed), key=groups_lib.forward_order_key)


def stats(params, group_axes, layer_order: Sequence[str] | None = None, output_axis: int = -1) -> dict[str, Any]:
    """Sparsity of the grouped leaves.

    Returns a dict with
      'group_sparsity': % of groups that are entirely zero;
      'param_sparsity': % of elements of the grouped leaves that are exactly zero (also counts unstructured
        zeros, e.g. from the l1 prox);
      'params_in_zero_groups': % of elements of the grouped leaves that lie in all-zero groups;
      'per_layer': [(path, active groups, total groups), ...] in forward order (``layer_order`` if given,
        else a natural sort with stem modules first);
      'zero_output_filters' / 'total_output_filters' / 'output_filter_sparsity' (%): all-zero slices along
        ``output_axis``, the quantity the reference's CelebA CSV reports;
      'num_groups', 'num_zero_groups', 'num_params', 'num_zero_params', 'num_layers', 'num_zero_layers'.
    """
    flat = groups_lib.flatten_grouped(params, group_axes)
    counts = np.asarray(jax.device_get(sparsity_counts(params, group_axes, output_axis)), np.int64)
    rows = {}
    tot = dict(
        groups=0, zero_groups=0, params=0, zero_params=0, params_in_zero_groups=0, out=0, zero_out=0, zero_layers=0
    )
    for (path, leaf, axis), (zg, zp, zo) in zip(flat, counts):
        shape = tuple(leaf.shape)
        n_groups = groups_lib.num_groups(shape, axis)
        numel = int(np.prod(shape))
        rows[path] = (path, int(n_groups - zg), int(n_groups))
        tot["groups"] += n_groups
        tot["zero_groups"] += int(zg)
        tot["params"] += numel
        tot["zero_params"] += int(zp)
        tot["params_in_zero_groups"] += int(zg) * groups_lib.group_size(shape, axis)
        tot["out"] += shape[output_axis]
        tot["zero_out"] += int(zo)
        tot["zero_layers"] += int(zg == n_groups)
    pct = lambda a, b: 100.0 * a / b if b else 0.0
    return {
        "group_sparsity": pct(tot["zero_groups"], tot["groups"]),
        "param_sparsity": pct(tot["zero_params"], tot["params"]),
        "params_in_zero_groups": pct(tot["params_in_zero_groups"], tot["params"]),
        "per_layer": [rows[p] for p in order_layers(list(rows), layer_order)],
        "zero_output_filters": tot["zero_out"],
        "total_output_filters": tot["out"],
        "output_filter_sparsity": pct(tot["zero_out"], tot["out"]),
        "num_groups": tot["groups"],
        "num_zero_groups": tot["zero_groups"],
        "num_params": tot["params"],
        "num_zero_params": tot["zero_params"],
        "num_layers": len(rows),
        "num_zero_layers": tot["zero_layers"],
    }
