"""Physical channel compaction: turn a group-sparse ResNetD (dense kernels full of zeroed input channels) into a
smaller dense network that computes the same outputs in eval mode.

Zeros in a dense kernel cost as much as any other number, so a sparse model only gets faster once its zeroed
channels are removed. ``compact(params, batch_stats, model, input_size=(H, W))`` does that for a
``ResNetD`` or a ``MultiTaskModel`` and returns a :class:`CompactModel`: new params, a static definition with the
per-layer widths and channel index sets, and a report of what was folded or could not be removed, and why.

How it works (all exact in eval mode; the only differences are float rounding):

1. **Which channels depend on the input.** A conv output channel depends on the input when its filter has a
   non-zero weight on an input-dependent channel and its BN scale γ is non-zero; the image's colour channels
   depend on the input; max-pool, ReLU and the residual sum keep dependence. Every other channel is an
   input-independent *constant map*. Its value is read off one dense eval-mode pass on any image (zeros):
   after BN+ReLU it is relu(β − γ·μ/√(σ²+ε)) for a conv whose filter is zero, and a spatial map once a padded
   conv has mixed constant channels with its zero padding.
2. **Which channels are needed** (backwards from the output): an input-dependent channel is kept when some kept
   output of a consumer conv has a non-zero weight on it, or the residual sum passes it on to a kept channel.
   Inside a bottleneck (conv1→conv2→conv3) a channel whose consumer group is zero is dropped together with the
   producer's filter and its BN entries. A residual-stream channel stays in the stream while any reader or the
   skip connection still needs it; each reader convolves only the channels it did not zero (a gather of its
   input channels), and a stream channel that no reader needs is dropped from the whole stage.
3. **Constant channels are folded** into their consumer: the consumer's response to the constant maps is
   computed with its real padding, stride and dilation at the given input size, and added as a bias. For a 1×1
   conv (or an interior-only response) this bias is one number per channel; where zero padding makes it vary
   over the border it is kept as a per-position map [H', W', C] (see ``CompactModel.spatial_bias_layers``), and
   the compact model then only accepts images of ``input_size``. A whole conv whose inputs are all zero is not
   computed at all: its constant output is folded the same way.
4. BN is folded into the kept kernels (kernel·γ/√(σ²+ε), bias β − μ·γ/√(σ²+ε)).

The task heads are not sparsified by the prox (groups live on ``backbone/`` only), so they are kept as they are
and read the full backbone features; channels of the features that are constant are re-inserted as constants.

The compact forward pass is a pure function, ``compact_model.apply(compact_model.params, images, dtype=...)``;
it jits and runs in float32 or bfloat16. ``save_compact`` / ``load_compact`` export it as a JSON definition and
an ``.npz`` of arrays.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_sparse_jax import fileio, sparsity
from mtl_sparse_jax.models import conv as conv_lib
from mtl_sparse_jax.models import graph, layers
from mtl_sparse_jax.models import multitask as multitask_lib
from mtl_sparse_jax.models import resnetd as resnetd_lib

BN_EPSILON = layers.BatchNorm.epsilon  # the backbone's BNs use the default
KEY_SEPARATOR = "|"


class CompactionError(ValueError):
    """Params or batch stats do not fit the model; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# The network as a list of nodes


def backbone_nodes(depth: int, output_stride: int) -> list[graph.Node]:
    """The ResNetD graph (`models.graph.nodes`), with its errors as CompactionError."""
    try:
        return graph.nodes(depth, output_stride)
    except ValueError as e:
        raise CompactionError(str(e)) from None


def _lookup(tree: Mapping, path: str, what: str, depth: int):
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise CompactionError(
                f"{what} has no entry '{path}' (missing '{part}') for ResNetD-{depth}; pass the "
                f"{what} of a model built with the same depth and width"
            )
        node = node[part]
    return node


def _conv2d(x, kernel, stride, dilation):
    """The backbone's conv (layers.Conv2d): explicit zero padding dilation·(k−1)/2, padding-aware, NHWC/HWIO."""
    pad = layers.same_padding(kernel.shape[0], dilation)
    return conv_lib.conv2d(x, kernel, stride=stride, dilation=dilation, padding=pad)


# ----------------------------------------------------------------------------------------------------------------
# Static definition of a compact model


@dataclasses.dataclass(frozen=True)
class CompactOp:
    """One op of the compact backbone. Index tuples are positions in the producer's compact channel layout.

    kind 'input': ``gather`` picks the image channels the stem reads (None: all three).
    kind 'conv': reads ``inputs[0]``, takes channels ``gather`` (None: all), convolves with params[name]['kernel']
      (BN folded in), adds params[name]['bias'] ([C] or a [H', W', C] map), then ReLU if ``relu``.
    kind 'maxpool': 3×3/2 max-pool with −inf padding.
    kind 'add': ReLU of the sum of its tensor operands (``inputs``; an identity operand is first re-ordered
      with ``gather``, where −1 marks a channel it does not carry) and of params[name]['bias'] if ``has_bias``
      (the constant part of the sum).
    kind 'output': scatters the compact features into the full width ``channels`` at ``scatter`` and fills the
      other channels with params['features']['bias'] (None: the layout is already complete).
    """

    name: str
    kind: str
    inputs: tuple[str, ...] = ()
    gather: tuple[int, ...] | None = None
    stride: int = 1
    dilation: int = 1
    relu: bool = False
    has_bias: bool = False
    scatter: tuple[int, ...] | None = None
    channels: int = 0


@dataclasses.dataclass(frozen=True)
class LayerWidths:
    """Input and output channels of one conv, dense and compact (the compact input counts the gathered channels)."""

    name: str
    in_dense: int
    out_dense: int
    in_compact: int
    out_compact: int
    kernel_size: int
    stride: int
    dilation: int


@dataclasses.dataclass(frozen=True)
class CompactDefinition:
    """Everything static about a compact model: hashable, JSON-able, enough to rebuild ``apply``."""

    ops: tuple[CompactOp, ...]
    layouts: tuple[tuple[str, tuple[int, ...]], ...]  # node name → original channel ids in compact order
    widths: tuple[LayerWidths, ...]
    depth: int
    output_stride: int
    input_size: tuple[int, int]
    feature_channels: int
    heads: tuple[multitask_lib.HeadSpec, ...] = ()
    head_width_multiplier: float = 1.0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["heads"] = [dataclasses.asdict(h) for h in self.heads]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> CompactDefinition:
        try:
            return cls(
                ops=tuple(
                    CompactOp(
                        **{
                            **op,
                            "inputs": tuple(op["inputs"]),
                            "gather": None if op["gather"] is None else tuple(op["gather"]),
                            "scatter": None if op["scatter"] is None else tuple(op["scatter"]),
                        }
                    )
                    for op in d["ops"]
                ),
                layouts=tuple((name, tuple(ids)) for name, ids in d["layouts"]),
                widths=tuple(LayerWidths(**w) for w in d["widths"]),
                depth=int(d["depth"]),
                output_stride=int(d["output_stride"]),
                input_size=tuple(d["input_size"]),
                feature_channels=int(d["feature_channels"]),
                heads=tuple(multitask_lib.HeadSpec(**h) for h in d["heads"]),
                head_width_multiplier=float(d["head_width_multiplier"]),
            )
        except (KeyError, TypeError) as e:
            raise CompactionError(
                f"compact model definition is incomplete or malformed ({e!r}); re-export it with save_compact"
            ) from None


def apply_compact(
    definition: CompactDefinition,
    params: Mapping,
    images: jax.Array,
    *,
    dtype=jnp.float32,
    return_features: bool = False,
):
    """Runs a compact model: backbone features [B, h, w, C] for a backbone-only model, else {task: raw output}
    (float32, as ``MultiTaskModel``); with ``return_features`` also the features, as (outputs, features).

    ``dtype`` is the computation dtype (float32 or bfloat16); parameters are cast to it.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"apply_compact expects NHWC RGB images [B,H,W,3], got shape {images.shape}")
    if tuple(images.shape[1:3]) != tuple(definition.input_size) and _has_spatial_bias(definition, params):
        raise ValueError(
            f"this compact model folds constant channels through zero padding at input size "
            f"{tuple(definition.input_size)}, got images of size {tuple(images.shape[1:3])}; re-run compact() with "
            f"input_size={tuple(images.shape[1:3])}"
        )
    acts: dict[str, Any] = {}
    batch = images.shape[0]
    for op in definition.ops:
        if op.kind == "input":
            x = images.astype(dtype)
            acts[op.name] = x if op.gather is None else jnp.take(x, np.asarray(op.gather, np.int32), axis=-1)
        elif op.kind == "conv":
            p = params[op.name]
            x = acts[op.inputs[0]]
            if op.gather is not None:
                x = jnp.take(x, np.asarray(op.gather, np.int32), axis=-1)
            y = _conv2d(x, p["kernel"].astype(dtype), op.stride, op.dilation) + p["bias"].astype(dtype)
            acts[op.name] = nn.relu(y) if op.relu else y
        elif op.kind == "maxpool":
            acts[op.name] = layers.max_pool_3x3_s2(acts[op.inputs[0]])
        elif op.kind == "add":
            total = None
            for operand in op.inputs:
                t = acts[operand]
                if operand == op.inputs[-1] and op.gather is not None:
                    idx = np.asarray(op.gather, np.int32)
                    if np.any(idx < 0):
                        t = jnp.concatenate([t, jnp.zeros(t.shape[:-1] + (1,), t.dtype)], axis=-1)
                        idx = np.where(idx < 0, t.shape[-1] - 1, idx)
                    t = jnp.take(t, idx, axis=-1)
                total = t if total is None else total + t
            if op.has_bias:
                bias = params[op.name]["bias"].astype(dtype)
                total = bias if total is None else total + bias
            if total is None:
                raise AssertionError(f"add {op.name} has neither operands nor a constant")
            if total.ndim == 3:  # an entirely constant block output: broadcast to the batch
                total = jnp.broadcast_to(total, (batch,) + total.shape)
            acts[op.name] = nn.relu(total)
        elif op.kind == "output":
            x = acts[op.inputs[0]] if op.inputs else None
            if op.scatter is None:
                features = x
            else:
                fill = params[op.name]["bias"].astype(dtype)
                fill = fill if fill.ndim == 3 else fill[None, None, :]
                h, w = (x.shape[1], x.shape[2]) if x is not None else fill.shape[:2]  # all-constant: fill is a map
                features = jnp.broadcast_to(fill, (batch, h, w, op.channels))
                if x is not None and op.scatter:
                    features = features.at[..., np.asarray(op.scatter, np.int32)].set(x)
            acts[op.name] = features
    features = acts["features"]
    if not definition.heads:
        return features
    outputs = {}
    for spec in definition.heads:
        key = multitask_lib.head_param_name(spec.name)
        head = multitask_lib.build_head(spec, definition.head_width_multiplier, dtype=dtype)
        variables = {"params": params["heads"][key]}
        if "batch_stats" in params and key in params["batch_stats"]:
            variables["batch_stats"] = params["batch_stats"][key]
        outputs[spec.name] = head.apply(variables, features, train=False).astype(jnp.float32)
    if return_features:
        return outputs, features
    return outputs


def _has_spatial_bias(definition: CompactDefinition, params: Mapping) -> bool:
    return any(
        op.name in params and "bias" in params[op.name] and np.ndim(params[op.name]["bias"]) == 3
        for op in definition.ops
    )


@dataclasses.dataclass
class CompactModel:
    """A compacted model: ``apply(params, images, dtype=...)`` with ``params``; ``definition`` holds the widths and
    index sets; ``report`` lists what was removed, folded or kept, and why."""

    definition: CompactDefinition
    params: dict
    report: dict

    def apply(self, params: Mapping, images: jax.Array, *, dtype=jnp.float32, return_features: bool = False):
        return apply_compact(self.definition, params, images, dtype=dtype, return_features=return_features)

    def __call__(self, images: jax.Array, *, dtype=jnp.float32, return_features: bool = False):
        return self.apply(self.params, images, dtype=dtype, return_features=return_features)

    @property
    def widths(self) -> dict[str, LayerWidths]:
        return {w.name: w for w in self.definition.widths}

    @property
    def spatial_bias_layers(self) -> list[str]:
        """Layers whose folded constant is a per-position map (zero padding met a constant channel)."""
        return [
            op.name
            for op in self.definition.ops
            if op.name in self.params and "bias" in self.params[op.name] and np.ndim(self.params[op.name]["bias"]) == 3
        ]

    def layout(self, node: str) -> tuple[int, ...]:
        """Original channel ids, in compact order, of a node's compact activation (e.g. 'layer2_1', 'stem')."""
        return dict(self.definition.layouts)[node]

    def flops(self, batch_size: int = 1) -> int:
        """Multiply-adds ×2 of the backbone's convs in the compact model (analytic, heads excluded)."""
        return _conv_flops(self.definition, batch_size, compact=True)

    def dense_flops(self, batch_size: int = 1) -> int:
        """The same count for the dense backbone it came from."""
        return _conv_flops(self.definition, batch_size, compact=False)


def _out_hw(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    # Convs pad to 'same' size, so only the stride changes the size: ceil(h / stride).
    return tuple(-(-v // stride) for v in hw)


def _conv_flops(definition: CompactDefinition, batch_size: int, *, compact: bool) -> int:
    hw = tuple(definition.input_size)
    sizes = {"input": hw}
    total = 0
    widths = {w.name: w for w in definition.widths}
    for node in backbone_nodes(definition.depth, definition.output_stride):
        if node.kind == "conv":
            sizes[node.name] = _out_hw(sizes[node.inputs[0]], node.stride)
            w = widths[node.name]
            cin, cout = (w.in_compact, w.out_compact) if compact else (w.in_dense, w.out_dense)
            h, wd = sizes[node.name]
            total += 2 * batch_size * h * wd * node.kernel_size**2 * cin * cout
        elif node.kind == "maxpool":
            sizes[node.name] = _out_hw(sizes[node.inputs[0]], 2)
        else:
            sizes[node.name] = sizes[node.inputs[0]] if node.inputs else hw
    return total


# ----------------------------------------------------------------------------------------------------------------
# Compaction


def _model_parts(model: nn.Module, params: Mapping, batch_stats: Mapping):
    """(backbone params, backbone stats, depth, output_stride, head specs, head multiplier, head variables)."""
    if isinstance(model, multitask_lib.MultiTaskModel):
        if model.taps:
            raise CompactionError(
                "compaction of a model with heads at backbone taps (model.taps / lomt.layers_file) is not supported; "
                "the report of a lomt_vs_mtl sweep (tables/lomt_vs_mtl.md) times such models dense"
            )
        for key in ("backbone",):
            if key not in params or key not in batch_stats:
                raise CompactionError(
                    f"params and batch_stats of a MultiTaskModel need a '{key}' entry; pass "
                    "variables['params'] and variables['batch_stats'] of the whole model"
                )
        heads = tuple(model.heads)
        head_params = {}
        head_stats = {}
        for spec in heads:
            key = multitask_lib.head_param_name(spec.name)
            if key not in params:
                raise CompactionError(
                    f"params have no '{key}' for task {spec.name!r}; the model's heads and the "
                    "checkpoint must list the same tasks"
                )
            head_params[key] = params[key]
            if key in batch_stats:
                head_stats[key] = batch_stats[key]
        return (
            params["backbone"],
            batch_stats["backbone"],
            model.depth,
            model.output_stride,
            heads,
            model.head_width_multiplier,
            {"heads": head_params, "batch_stats": head_stats},
        )
    if isinstance(model, resnetd_lib.ResNetD):
        return params, batch_stats, model.depth, model.output_stride, (), 1.0, {}
    raise CompactionError(f"compact() takes a ResNetD or MultiTaskModel, got {type(model).__name__}")


def _as_np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float32)


def compact(
    params: Mapping, batch_stats: Mapping, model: nn.Module, *, input_size: tuple[int, int], gather_readers: bool = True
) -> CompactModel:
    """Physically removes the zeroed channels of a sparse ``ResNetD`` / ``MultiTaskModel`` (eval mode).

    Args:
      params: the model's params (``variables['params']``; a top-level 'loss_weights' entry is ignored).
      batch_stats: the model's ``variables['batch_stats']`` (running mean and variance).
      model: the Flax module the params belong to; its depth and output stride define the graph.
      input_size: (H, W) of the images the compact model will see. Needed to fold constant channels through
        zero-padded convs; the result accepts other sizes only when no such map was needed.
      gather_readers: a conv reading the residual stream gathers the channels it did not zero (fewest FLOPs).
        False convolves the whole compact stream with zero rows instead (no gather; for comparison).

    Returns:
      A :class:`CompactModel` whose eval-mode outputs equal the model's (float32: to rounding).
    """
    if len(tuple(input_size)) != 2 or min(input_size) < 1:
        raise CompactionError(f"input_size must be (H, W) of the images, got {input_size!r}")
    input_size = (int(input_size[0]), int(input_size[1]))
    bb_params, bb_stats, depth, output_stride, heads, head_wm, head_vars = _model_parts(model, params, batch_stats)
    nodes = backbone_nodes(depth, output_stride)
    by_name = {n.name: n for n in nodes}

    kernels, scales, shifts, bn_raw = _read_backbone(nodes, bb_params, bb_stats, depth)
    depends, width = _input_dependence(nodes, kernels, bn_raw, depth)
    values = _dense_values(nodes, kernels, bn_raw, input_size)  # constant maps: one dense pass on a zero image
    needed, layout, reads, feeds_add = _needed_channels(nodes, by_name, kernels, depends, width)
    analysis = _Analysis(
        nodes, by_name, kernels, scales, shifts, depends, width, values, needed, layout, reads, feeds_add
    )
    ops, new_params, widths, report_layers, folded, not_removed = _build_ops(analysis, gather_readers)
    ops = _drop_unproduced(ops)

    if heads:
        new_params["heads"] = jax.tree.map(_as_np, head_vars["heads"])
        new_params["batch_stats"] = jax.tree.map(_as_np, head_vars["batch_stats"])
        not_removed.append(
            {
                "layer": "heads",
                "channels": 0,
                "why": "task heads are not sparsified by the prox (groups are on backbone/ only); they "
                "are kept dense and read all feature channels",
            }
        )

    definition = CompactDefinition(
        ops=tuple(ops),
        layouts=tuple((n.name, tuple(int(c) for c in layout[n.name])) for n in nodes),
        widths=tuple(widths),
        depth=depth,
        output_stride=output_stride,
        input_size=input_size,
        feature_channels=int(width["features"]),
        heads=heads,
        head_width_multiplier=float(head_wm),
    )
    report = {
        "summary": {
            "convs": len(widths),
            "convs_not_computed": [w.name for w in widths if w.out_compact == 0],
            "input_channels_dense": sum(w.in_dense for w in widths),
            "input_channels_compact": sum(w.in_compact for w in widths),
            "output_channels_dense": sum(w.out_dense for w in widths),
            "output_channels_compact": sum(w.out_compact for w in widths),
        },
        "input_size": list(input_size),
        "dense_conv_flops_per_image": _conv_flops(definition, 1, compact=False),
        "compact_conv_flops_per_image": _conv_flops(definition, 1, compact=True),
        "layers": report_layers,
        "folded_constants": folded,
        "not_removed": not_removed + _stream_report(nodes, layout, reads, width),
        "spatial_bias_layers": [],
    }
    model_out = CompactModel(definition=definition, params=jax.tree.map(jnp.asarray, new_params), report=report)
    report["spatial_bias_layers"] = model_out.spatial_bias_layers
    return model_out


@dataclasses.dataclass
class _Analysis:
    """What the first passes found out about a sparse backbone; read by `_build_ops`."""

    nodes: list
    by_name: dict
    kernels: dict
    scales: dict
    shifts: dict
    depends: dict
    width: dict
    values: dict
    needed: dict
    layout: dict
    reads: dict
    feeds_add: dict


def _read_backbone(nodes, bb_params, bb_stats, depth):
    """Pass 0: every conv's kernel and its BN as (scale, shift) multipliers and raw (γ, β, μ, σ²), checked."""
    kernels, scales, shifts = {}, {}, {}
    bn_raw = {}
    for n in nodes:
        if n.kind != "conv":
            continue
        k = _as_np(_lookup(bb_params, f"{n.name}/kernel", "params", depth))
        if k.ndim != 4 or k.shape[0] != n.kernel_size or k.shape[1] != n.kernel_size:
            raise CompactionError(
                f"params '{n.name}/kernel' has shape {k.shape}, expected "
                f"[{n.kernel_size},{n.kernel_size},C_in,C_out] for ResNetD-{depth}"
            )
        gamma = _as_np(_lookup(bb_params, f"{n.bn}/scale", "params", depth))
        beta = _as_np(_lookup(bb_params, f"{n.bn}/bias", "params", depth))
        mean = _as_np(_lookup(bb_stats, f"{n.bn}/mean", "batch_stats", depth))
        var = _as_np(_lookup(bb_stats, f"{n.bn}/var", "batch_stats", depth))
        kernels[n.name] = k
        multiplier = gamma / np.sqrt(var + BN_EPSILON)
        scales[n.name] = multiplier
        shifts[n.name] = beta - mean * multiplier
        bn_raw[n.name] = (gamma, beta, mean, var)

    return kernels, scales, shifts, bn_raw


def _input_dependence(nodes, kernels, bn_raw, depth):
    """Pass 1, forward: which channels of every node depend on the input image (the rest are constant maps)."""
    # --- 1. input dependence, forward ------------------------------------------------------------------------------
    width = {"input": 3}
    depends: dict[str, np.ndarray] = {"input": np.ones(3, bool)}
    for n in nodes[1:]:
        if n.kind == "conv":
            src = n.inputs[0]
            k = kernels[n.name]
            if k.shape[2] != width[src]:
                raise CompactionError(
                    f"params '{n.name}/kernel' reads {k.shape[2]} channels but its input has "
                    f"{width[src]}; the params do not match ResNetD-{depth}"
                )
            reaches = (k != 0).any(axis=(0, 1))  # [C_in, C_out]
            depends[n.name] = (reaches[depends[src]].any(axis=0)) & (bn_raw[n.name][0] != 0)
            width[n.name] = k.shape[3]
        elif n.kind == "add":
            a, b = n.inputs
            if width[a] != width[b]:
                raise CompactionError(f"block {n.name}: residual widths differ ({width[a]} vs {width[b]})")
            depends[n.name] = depends[a] | depends[b]
            width[n.name] = width[a]
        else:
            depends[n.name] = depends[n.inputs[0]].copy()
            width[n.name] = width[n.inputs[0]]

    return depends, width


def _needed_channels(nodes, by_name, kernels, depends, width):
    """Pass 2, backward: which channels are needed, each node's compact layout, and what each conv reads."""
    # --- 2. what is needed, backward -------------------------------------------------------------------------------
    needed = {n.name: np.zeros(width[n.name], bool) for n in nodes}
    layout: dict[str, np.ndarray] = {}
    feeds_add = {}
    for n in nodes:
        if n.kind == "add":
            for operand in n.inputs:
                if by_name[operand].kind == "conv":
                    feeds_add[operand] = n.name
    reads: dict[str, np.ndarray] = {}  # conv → bool mask over its input's channels that it convolves
    for n in reversed(nodes):
        if n.kind == "output":
            needed[n.name][:] = True
            layout[n.name] = np.flatnonzero(depends[n.name])
            needed[n.inputs[0]] |= depends[n.inputs[0]]
        elif n.kind == "add":
            layout[n.name] = np.flatnonzero(depends[n.name] & needed[n.name])
            for operand in n.inputs:
                if by_name[operand].kind == "conv":
                    continue  # its layout is set below from this one
                needed[operand][layout[n.name]] |= depends[operand][layout[n.name]]
        elif n.kind == "conv":
            if n.name in feeds_add:
                add_layout = layout[feeds_add[n.name]]
                # Computed directly in the sum's layout; a channel that is constant here gets a zero filter and its
                # constant as bias. Skipped entirely when none of those channels depends on the input.
                layout[n.name] = add_layout if depends[n.name][add_layout].any() else add_layout[:0]
            else:
                layout[n.name] = np.flatnonzero(depends[n.name] & needed[n.name])
            src = n.inputs[0]
            nonzero = (kernels[n.name] != 0).any(axis=(0, 1))[:, layout[n.name]].any(axis=1)
            reads[n.name] = nonzero & depends[src]
            needed[src] |= reads[n.name]
        elif n.kind == "maxpool":
            layout[n.name] = np.flatnonzero(depends[n.name] & needed[n.name])
            needed[n.inputs[0]] |= needed[n.name] & depends[n.inputs[0]]
        elif n.kind == "input":
            layout[n.name] = np.flatnonzero(needed[n.name])
    # A max-pool's output layout must be its input's, channel for channel.
    for n in nodes:
        if n.kind == "maxpool" and not np.array_equal(layout[n.name], layout[n.inputs[0]]):
            raise AssertionError(f"max-pool {n.name} layout differs from its input")

    return needed, layout, reads, feeds_add


def _build_ops(a: _Analysis, gather_readers: bool):
    """Pass 3: the compact ops and params (BN folded, constants folded into biases) and the report entries."""
    nodes, by_name, kernels, scales, shifts = a.nodes, a.by_name, a.kernels, a.scales, a.shifts
    depends, width, values, needed, layout, reads, feeds_add = (
        a.depends,
        a.width,
        a.values,
        a.needed,
        a.layout,
        a.reads,
        a.feeds_add,
    )
    # --- 3. build ops and params -----------------------------------------------------------------------------------
    ops: list[CompactOp] = []
    new_params: dict[str, Any] = {}
    widths: list[LayerWidths] = []
    report_layers = []
    folded = []
    not_removed = []
    for n in nodes:
        if n.kind == "input":
            gather = None if len(layout["input"]) == 3 else tuple(int(i) for i in layout["input"])
            ops.append(CompactOp("input", "input", gather=gather))
        elif n.kind == "conv":
            src = n.inputs[0]
            src_layout = layout[src]
            used = np.flatnonzero(reads[n.name])
            if not gather_readers and len(used):
                # Convolve the whole compact input, with zero rows for the channels this conv does not read: more FLOPs,
                # no gather of the activation.
                used = np.asarray(src_layout)
            position = {int(c): p for p, c in enumerate(src_layout)}
            gather = tuple(position[int(c)] for c in used)
            if gather == tuple(range(len(src_layout))):
                gather = None
            out_ids = layout[n.name]
            k = kernels[n.name]
            constant_in = ~depends[src]
            response = None
            if constant_in.any():
                masked = values[src] * constant_in.astype(np.float32)
                response = np.asarray(_conv2d(jnp.asarray(masked[None]), jnp.asarray(k), n.stride, n.dilation))[0]
                if np.any(response[..., out_ids] != 0):
                    names = [
                        int(c) for c in np.flatnonzero(constant_in & (k != 0).any(axis=(0, 1))[:, out_ids].any(axis=1))
                    ]
                    if names:
                        folded.append(
                            {
                                "layer": n.name,
                                "constant_input_channels": len(names),
                                "why": "input channels are input-independent (their producer was zeroed); their "
                                "response, with this conv's zero padding, is folded into the bias",
                            }
                        )
            m = scales[n.name][out_ids]
            if len(out_ids):
                kernel = k[:, :, used][:, :, :, out_ids] * m
                bias = shifts[n.name][out_ids]
                if response is not None:
                    bias_map = bias + m * response[..., out_ids]
                    bias = bias_map[0, 0] if np.all(bias_map == bias_map[:1, :1]) else bias_map
                new_params[n.name] = {"kernel": kernel.astype(np.float32), "bias": np.asarray(bias, np.float32)}
                ops.append(
                    CompactOp(n.name, "conv", (src,), gather=gather, stride=n.stride, dilation=n.dilation, relu=n.relu)
                )
            widths.append(
                LayerWidths(
                    n.name,
                    k.shape[2],
                    k.shape[3],
                    int(len(used)) if len(out_ids) else 0,
                    int(len(out_ids)),
                    n.kernel_size,
                    n.stride,
                    n.dilation,
                )
            )
            zero_groups = int(np.sum(sparsity.zero_group_mask(k, 2)))
            entry = {
                "layer": n.name,
                "in_dense": k.shape[2],
                "out_dense": k.shape[3],
                "in_compact": int(len(used)) if len(out_ids) else 0,
                "out_compact": int(len(out_ids)),
                "zero_input_groups": zero_groups,
            }
            if n.name in feeds_add and len(out_ids):
                padded = int((~depends[n.name][out_ids]).sum())
                if padded:
                    not_removed.append(
                        {
                            "layer": n.name,
                            "channels": padded,
                            "why": "constant output channels computed with zero filters so that the residual "
                            "sum needs no scatter",
                        }
                    )
            if len(out_ids) == 0:
                entry["skipped"] = "every output channel is constant or unused"
            report_layers.append(entry)
        elif n.kind == "maxpool":
            if len(layout[n.name]):
                ops.append(CompactOp(n.name, "maxpool", n.inputs))
        elif n.kind == "add":
            out_ids = layout[n.name]
            tensors = []
            constant_map = None
            gather = None
            for operand in n.inputs:
                if by_name[operand].kind == "conv":
                    if len(layout[operand]):
                        tensors.append(operand)
                    else:
                        constant_map = _add_const(constant_map, values[operand][..., out_ids])
                else:
                    position = {int(c): p for p, c in enumerate(layout[operand])}
                    idx = tuple(position.get(int(c), -1) for c in out_ids)
                    missing = np.array([i < 0 for i in idx], bool)
                    if missing.any():
                        m_vals = values[operand][..., out_ids] * missing.astype(np.float32)
                        constant_map = _add_const(constant_map, m_vals)
                    if not missing.all():
                        tensors.append(operand)
                        gather = None if idx == tuple(range(len(layout[operand]))) else idx
            has_bias = False
            if constant_map is not None and (np.any(constant_map != 0) or not tensors):
                bias = constant_map[0, 0] if np.all(constant_map == constant_map[:1, :1]) else constant_map
                if not tensors and bias.ndim == 1:
                    bias = np.broadcast_to(
                        bias, constant_map.shape
                    ).copy()  # keeps the spatial size of the block output
                new_params[n.name] = {"bias": np.asarray(bias, np.float32)}
                has_bias = True
            # The identity operand is always last in ``inputs``; ``apply_compact`` gathers only that one.
            ordered = tuple(t for t in n.inputs if t in tensors)
            if gather is not None and (not ordered or ordered[-1] != n.inputs[-1]):
                raise AssertionError("identity gather on a non-identity operand")
            if len(out_ids):
                ops.append(CompactOp(n.name, "add", ordered, gather=gather, has_bias=has_bias))
            dead = int((depends[n.name] & ~needed[n.name]).sum())
            if dead:
                report_layers.append(
                    {
                        "layer": n.name,
                        "stream_channels_removed": dead,
                        "stream_dense": int(width[n.name]),
                        "stream_compact": int(len(out_ids)),
                    }
                )
        elif n.kind == "output":
            src = n.inputs[0]
            full = width[src]
            out_ids = layout[n.name]
            if len(out_ids) == full:
                ops.append(CompactOp("features", "output", (src,), channels=full))
            else:
                fill = values[src] * (~depends[src]).astype(np.float32)
                if len(out_ids) and np.all(fill == fill[:1, :1]):
                    fill = fill[0, 0]  # one value per channel; a map only where the size must be known
                new_params["features"] = {"bias": np.asarray(fill, np.float32)}
                ops.append(
                    CompactOp("features", "output", (src,), scatter=tuple(int(c) for c in out_ids), channels=full)
                )
                not_removed.append(
                    {
                        "layer": "features",
                        "channels": int(full - len(out_ids)),
                        "why": "constant feature channels are re-inserted so that the heads see the full width",
                    }
                )

    return ops, new_params, widths, report_layers, folded, not_removed


def _drop_unproduced(ops):
    """Pass 4: ops whose activation was never produced (fully constant convs) leave the operand lists."""
    produced = {op.name for op in ops}
    ops = [
        dataclasses.replace(op, inputs=tuple(i for i in op.inputs if i in produced))
        if op.kind in ("add", "output")
        else op
        for op in ops
    ]
    for op in ops:
        if op.kind in ("conv", "maxpool") and op.inputs[0] not in produced:
            raise AssertionError(f"{op.name} reads {op.inputs[0]}, which was removed")

    return ops


def _add_const(acc, value):
    return value.copy() if acc is None else acc + value


def _stream_report(nodes, layout, reads, width) -> list[dict]:
    """Residual-stream channels a reader zeroed but the stream keeps, because another reader or the skip needs them.

    They cost nothing in that reader (it gathers only its own channels) but the stream itself stays wide."""
    out = []
    for n in nodes:
        if n.kind not in ("add", "maxpool"):
            continue
        readers = [m for m in nodes if m.kind == "conv" and m.inputs and m.inputs[0] == n.name]
        kept = set(int(c) for c in layout[n.name])
        for r in readers:
            ignored = len(kept - set(int(c) for c in np.flatnonzero(reads[r.name])))
            if ignored:
                out.append(
                    {
                        "layer": n.name,
                        "reader": r.name,
                        "channels": ignored,
                        "why": "zero in this reader but still read by another reader or carried by the skip "
                        "connection; the reader gathers only its own channels",
                    }
                )
    return out


def _dense_values(nodes: Sequence[graph.Node], kernels, bn_raw, input_size) -> dict[str, np.ndarray]:
    """Every node's eval-mode activation [H, W, C] on a zero image, computed as the dense model does."""
    acts: dict[str, jax.Array] = {"input": jnp.zeros((1, *input_size, 3), jnp.float32)}
    for n in nodes[1:]:
        if n.kind == "conv":
            gamma, beta, mean, var = bn_raw[n.name]
            y = _conv2d(acts[n.inputs[0]], jnp.asarray(kernels[n.name]), n.stride, n.dilation)
            y = (y - mean) * (jax.lax.rsqrt(jnp.asarray(var) + BN_EPSILON) * gamma) + beta
            acts[n.name] = nn.relu(y) if n.relu else y
        elif n.kind == "maxpool":
            acts[n.name] = layers.max_pool_3x3_s2(acts[n.inputs[0]])
        elif n.kind == "add":
            acts[n.name] = nn.relu(acts[n.inputs[0]] + acts[n.inputs[1]])
        else:
            acts[n.name] = acts[n.inputs[0]]
    return {k: np.asarray(v[0], np.float32) for k, v in acts.items()}


# ----------------------------------------------------------------------------------------------------------------
# Export


def save_compact(path: str, model: CompactModel) -> None:
    """Writes ``<path>.json`` (definition and report) and ``<path>.npz`` (arrays, '|'-joined keys), atomically."""
    flat = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        # Node names contain '/', so keys are joined with '|'.
        flat[KEY_SEPARATOR.join(str(getattr(k, "key", k)) for k in key_path)] = np.asarray(leaf)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    fileio.write_bytes(path + ".npz", buffer.getvalue())
    doc = {"definition": model.definition.to_json(), "report": model.report}
    fileio.write_text(path + ".json", json.dumps(doc, indent=1))


def load_compact(path: str) -> CompactModel:
    """Reads what ``save_compact(path, ...)`` wrote."""
    for suffix in (".json", ".npz"):
        if not os.path.exists(path + suffix):
            raise FileNotFoundError(
                f"{path + suffix} does not exist; export the model with save_compact({path!r}, ...)"
            )
    with open(path + ".json") as f:
        doc = json.load(f)
    definition = CompactDefinition.from_json(doc["definition"])
    params: dict[str, Any] = {}
    with np.load(path + ".npz", allow_pickle=False) as arrays:
        for key in arrays.files:
            node = params
            parts = key.split(KEY_SEPARATOR)
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = jnp.asarray(arrays[key])
    return CompactModel(definition=definition, params=params, report=doc.get("report", {}))
