"""Dilated ResNet-D backbone (deep stem, stride in the 3×3 conv) as the paper's reference code defines it.

The graph (stages, blocks, convs in forward order, names, taps) is described once in `models/graph.py`;
this module builds the Flax network from it.

Output stride (the config's ``output_stride``) sets the stage strides and dilations:

====== ============ ==============
stride strides      dilations
====== ============ ==============
8      (1, 2, 1, 1) (1, 1, 2, 4)   the reference: [B, H/8, W/8, 2048]
16     (1, 2, 2, 1) (1, 1, 1, 2)
32     (1, 2, 2, 2) (1, 1, 1, 1)   a plain ResNet-D
====== ============ ==============

Names (the sparsity groups and the per-layer plots depend on them): ``stem_conv1..3``, ``stem_bn1..3``, blocks
``layer<s>_<b>`` (s = 1..4, b from 0) with children ``conv1, bn1, conv2, bn2, conv3, bn3, downsample_conv,
downsample_bn``. Convs have no bias. ``conv_paths(depth)`` lists the convs in forward order.

Taps (``taps=`` of ``ResNetD.__call__``), listed by ``tap_names(depth)``:

* a conv path, e.g. ``'layer3_0/conv2'`` or ``'stem_conv1'``: where ``tap_point`` says. ``'relu'`` (the
  module's default) is the BN output after the ReLU where the network applies one right there (stem convs,
  bottleneck conv1/conv2, basic-block conv1), and the BN output for the last conv of a block (``conv3``, or
  ``conv2`` of a basic block) and for ``downsample_conv``, which feed the residual sum; ``'bn'`` is the BN output;
  ``'conv'`` (the config's default, ``model.tap_point``) is the raw conv output before its BN, as a PyTorch
  forward hook on the conv sees it;
* ``'stem'``: after the max-pool;
* a block name, e.g. ``'layer3_0'``: the block's output (after the residual sum and ReLU);
* a stage name, ``'layer1'``..``'layer4'``: the output of the stage's last block.

Truncation (``outputs``): a backbone built with ``outputs=(tap, ...)`` computes, and has params for, only the
convs, BNs and blocks those taps depend on (`graph.ancestors`), and returns ``{tap: value}``; e.g. with
``outputs=('layer3_3/conv1',)`` and ``tap_point='conv'`` it ends with that conv, without its BN. Each value equals
the full network's value at the same tap with the same params.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_sparse_jax.models import graph
from mtl_sparse_jax.models.layers import BatchNorm, Conv2d, max_pool_3x3_s2

Dtype = Any
TAP_POINTS = ("conv", "bn", "relu")


def scaled_width(channels: int, multiplier: float) -> int:
    """channels·multiplier rounded half up, at least 1."""
    return max(1, int(channels * multiplier + 0.5))


class ResidualBlock(nn.Module):
    """One block of the graph (`graph.BlockSpec`): its convs, each followed by BN (and ReLU where the spec says),
    plus the identity or the downsample conv + BN as the shortcut, then the residual sum and a ReLU.

    Returns (output, {conv name: the conv's value at ``tap_point``}). A truncated block (``convs`` / ``norms``
    given) computes only the listed convs and BNs and returns output None unless ``output`` is set."""

    spec: graph.BlockSpec
    width_multiplier: float = 1.0
    bn_updates: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    tap_point: str = "relu"
    convs: tuple[str, ...] | None = None  # conv names to compute; None = all
    norms: tuple[str, ...] | None = None  # conv names whose BN (and ReLU) to compute; None = all
    output: bool = True  # compute the residual sum

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)
        outs = {}

        def conv_bn(y, c: graph.ConvSpec):
            width = scaled_width(c.planes, self.width_multiplier) * c.expansion
            y = conv(width, c.kernel_size, c.stride, c.dilation, name=c.name)(y)
            if self.tap_point == "conv":
                outs[c.name] = y
            if self.norms is not None and c.name not in self.norms:
                return y
            y = norm(name=c.bn)(y, train=train)
            if self.tap_point == "bn":
                outs[c.name] = y
            y = nn.relu(y) if c.relu else y
            if self.tap_point == "relu":
                outs[c.name] = y
            return y

        y = x
        for c in self.spec.convs:
            if self.convs is not None and c.name not in self.convs:
                break
            y = conv_bn(y, c)
        shortcut = x
        if self.spec.shortcut is not None and (self.convs is None or self.spec.shortcut.name in self.convs):
            shortcut = conv_bn(x, self.spec.shortcut)
        if not self.output:
            return None, outs
        return nn.relu(y + shortcut.astype(y.dtype)), outs


class ResNetD(nn.Module):
    """Dilated ResNet-D backbone; see the module docstring for the structure, names and taps.

    Attributes:
      depth: 18, 50 or 101.
      width_multiplier: scales every width (stem 64/64/128, planes 64/128/256/512), rounded, at least 1.
      output_stride: 8 (the reference), 16 or 32.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); BN statistics are always computed in float32.
      param_dtype: storage dtype of the parameters.
      bn_updates: apply each BN running-statistics update this many times per train-mode call (see
        ``BatchNorm.num_updates``); the multi-task model uses it to mimic the reference's per-task re-runs.
      tap_point: where a conv tap reads: 'conv' (raw conv output), 'bn' or 'relu' (see the module docstring).
      outputs: taps to truncate to: only what they depend on is built, and the call returns {tap: value}.
    """

    depth: int = 50
    width_multiplier: float = 1.0
    output_stride: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_updates: int = 1
    tap_point: str = "relu"
    outputs: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, taps: Sequence[str] = ()):
        """Features [B, H/os, W/os, C]; with ``taps``, (features, {tap: array}); with ``outputs``, {tap: array}."""
        block_specs = graph.blocks(self.depth, self.output_stride)
        if self.width_multiplier <= 0:
            raise ValueError(
                f"width_multiplier must be > 0, got {self.width_multiplier!r} (config model.width_multiplier)"
            )
        if x.ndim != 4:
            raise ValueError(f"ResNetD expects NHWC images [B,H,W,C], got shape {x.shape}")
        if isinstance(taps, str):
            taps = (taps,)
        graph.check_taps(self.depth, (*taps, *self.outputs))
        if self.tap_point not in TAP_POINTS:
            raise ValueError(f"tap_point must be one of {TAP_POINTS}, got {self.tap_point!r} (config model.tap_point)")
        if self.outputs and taps:
            raise ValueError("a truncated ResNetD (outputs=...) returns its outputs; call it without taps=")
        needed = graph.ancestors(self.depth, self.output_stride, self.outputs) if self.outputs else None
        # A conv's BN is computed when a later node reads the conv, or when the conv is tapped after its BN.
        read = {i for n in graph.nodes(self.depth, self.output_stride) if needed and n.name in needed for i in n.inputs}
        if self.tap_point != "conv":
            read |= set(self.outputs)
        width = functools.partial(scaled_width, multiplier=self.width_multiplier)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)

        found: dict[str, jax.Array] = {}
        y = x
        for c in graph.stem_convs():
            if needed is not None and c.name not in needed:
                return {t: found[t] for t in self.outputs}
            y = found[c.name] = conv(width(c.planes) * c.expansion, c.kernel_size, c.stride, name=c.name)(y)
            if needed is not None and c.name not in read:
                return {t: found[t] for t in self.outputs}
            y = norm(name=c.bn)(y, train=train)
            if self.tap_point == "bn":
                found[c.name] = y
            y = nn.relu(y)
            if self.tap_point == "relu":
                found[c.name] = y
        if needed is not None and "stem" not in needed:
            return {t: found[t] for t in self.outputs}
        y = found["stem"] = max_pool_3x3_s2(y)

        for block in block_specs:
            if needed is not None and not any(n.startswith(block.name + "/") or n == block.name for n in needed):
                break
            local = None if needed is None else tuple(c for c in block.conv_names if f"{block.name}/{c}" in needed)
            norms = None if needed is None else tuple(c for c in block.conv_names if f"{block.name}/{c}" in read)
            y, outs = ResidualBlock(
                spec=block,
                width_multiplier=self.width_multiplier,
                bn_updates=self.bn_updates,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                tap_point=self.tap_point,
                convs=local,
                norms=norms,
                output=needed is None or block.name in needed,
                name=block.name,
            )(y, train=train)
            found.update({f"{block.name}/{k}": v for k, v in outs.items()})
            if y is None:
                break
            found[block.name] = y
            found[f"layer{block.stage}"] = y

        if needed is not None:
            return {t: found[t] for t in self.outputs}
        if not taps:
            return y
        return y, {t: found[t] for t in taps}


ResNetD18 = functools.partial(ResNetD, depth=18)
ResNetD50 = functools.partial(ResNetD, depth=50)
ResNetD101 = functools.partial(ResNetD, depth=101)
resnetd18, resnetd50, resnetd101 = ResNetD18, ResNetD50, ResNetD101
