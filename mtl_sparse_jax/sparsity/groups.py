"""Which params leaves are grouped, and along which axis.

A *group-axes tree* has the structure of the params and holds, per leaf, either an int (the leaf is split into
groups ``x.take(c, axis)``, one per index c along that axis) or None (the leaf is not grouped). It is built from
regex rules on the '/'-joined param path, the way big_vision selects optimizer masks, e.g.
``'backbone/layer3_0/conv2/kernel'``.

Everywhere in this package ``group_axes`` may also be a callable ``params -> group-axes tree``; it is resolved
with :func:`resolve_group_axes` against the actual params.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Iterable, Sequence, Union

import jax

PyTree = Any
GroupAxes = Union[PyTree, Callable[[PyTree], PyTree]]

# Every 4-D conv kernel (HWIO) under 'backbone/', grouped by input channel: group c = kernel[:, :, c, :].
DEFAULT_RULES = ((r"^backbone/.*kernel$", 2),)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'/'-joined names of a jax key path: ``(DictKey('backbone'), DictKey('conv'))`` -> ``'backbone/conv'``."""
    return "/".join(_key_str(k) for k in path)


def group_axes_by_regex(
    params: PyTree, rules: Iterable[tuple[str, int | None]] = DEFAULT_RULES, ndim: int | None = 4
) -> PyTree:
    """Group axes from regex rules on param paths.

    Args:
      params: a params pytree (arrays or ``jax.ShapeDtypeStruct``s; only ``.ndim``/``.shape`` are read).
      rules: ``(regex, axis)`` pairs, tried in order with ``re.search``; the first match decides. ``axis`` None
        excludes the leaf, so an early ``(r'pattern', None)`` carves exceptions out of a later rule.
      ndim: only leaves with exactly this many dims may be grouped (None: any rank).

    Returns:
      A pytree like ``params`` with an int axis (normalised to be non-negative) or None at each leaf.
    """
    compiled = [(re.compile(rx), ax) for rx, ax in rules]

    def axis_for(path, leaf):
        leaf_ndim = len(leaf.shape)
        if ndim is not None and leaf_ndim != ndim:
            return None
        name = path_str(path)
        for rx, ax in compiled:
            if rx.search(name):
                if ax is None:
                    return None
                if not -leaf_ndim <= ax < leaf_ndim:
                    raise ValueError(f"group axis {ax} out of range for {name} with shape {tuple(leaf.shape)}")
                return ax % leaf_ndim
        return None

    return jax.tree_util.tree_map_with_path(axis_for, params)


def default_group_axes(params: PyTree) -> PyTree:
    """The paper's groups: every 4-D ``kernel`` under ``backbone/``, grouped along axis 2 (HWIO input channel).

    This includes the stem convs and the downsample convs, as the reference does (its §4.2); n_g = kh·kw·C_out.
    """
    return group_axes_by_regex(params, DEFAULT_RULES, ndim=4)


def resolve_group_axes(group_axes: GroupAxes, params: PyTree) -> PyTree:
    """Call ``group_axes`` on the params if it is callable, and check it matches the params' structure."""
    axes = group_axes(params) if callable(group_axes) else group_axes
    try:
        flat = jax.tree_util.tree_structure(params).flatten_up_to(axes)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "group_axes must have the structure of the params (int or None per leaf); "
            f"build it with group_axes_by_regex(params, ...). Mismatch: {e}"
        ) from None
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), a in zip(leaves, flat):
        if a is None:
            continue
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(
                f"group_axes leaves must be int or None, got {a!r} ({type(a).__name__}) for {path_str(path)}"
            )
        if not -len(leaf.shape) <= a < len(leaf.shape):
            raise ValueError(f"group axis {a} out of range for {path_str(path)} with shape {tuple(leaf.shape)}")
    return axes


def flatten_grouped(params: PyTree, group_axes: GroupAxes) -> list[tuple[str, Any, int]]:
    """``[(path, leaf, axis), ...]`` for the grouped leaves, in tree-flattening order (sorted dict keys)."""
    axes = resolve_group_axes(group_axes, params)
    flat_axes = jax.tree_util.tree_structure(params).flatten_up_to(axes)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(path_str(p), leaf, ax) for (p, leaf), ax in zip(leaves, flat_axes) if ax is not None]


def map_with_axes(fn: Callable[..., Any], group_axes: PyTree, tree: PyTree, *rest: PyTree) -> PyTree:
    """``tree_map(fn, axis, leaf, *rest_leaves)`` over the params' structure; ``axis`` is an int or None."""
    treedef = jax.tree_util.tree_structure(tree)
    flat_axes = treedef.flatten_up_to(group_axes)
    flat = [treedef.flatten_up_to(t) for t in (tree,) + rest]
    return treedef.unflatten([fn(ax, *leaves) for ax, *leaves in zip(flat_axes, *flat)])


def group_size(shape: Sequence[int], axis: int) -> int:
    """Number of elements in one group, n_g = numel / shape[axis] (kh·kw·C_out for an HWIO kernel on axis 2)."""
    return math.prod(shape) // shape[axis]


def num_groups(shape: Sequence[int], axis: int) -> int:
    """Number of groups in a leaf, shape[axis] (C_in for an HWIO kernel on axis 2)."""
    return shape[axis]


def natural_key(s: str):
    """Sort key that orders digit runs numerically: 'layer3_2' < 'layer3_10'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def forward_order_key(path: str):
    """Default forward order of layer paths: natural sort, with 'stem*' modules first inside each top-level module.

    For the ResNetD backbone this gives stem_conv1..3, layer1_0/conv1, conv2, conv3, downsample_conv, layer1_1, …,
    layer4_2 (a plain sorted flatten puts 'layer3_10' before 'layer3_2' and 'stem' after 'layer').
    """
    top, _, rest = path.partition("/")
    return (natural_key(top), 0 if re.match(r"stem", rest) else 1, natural_key(rest))
