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

* a conv path, e.g. ``'layer3_0/conv2'`` or ``'stem_conv1'``: the conv's output after its BN, and after the ReLU
  where the network applies one right there (stem convs, bottleneck conv1/conv2, basic-block conv1). For the
  last conv of a block (``conv3``, or ``conv2`` of a basic block) and for ``downsample_conv`` it is the BN output
  before the residual sum and its ReLU;
* ``'stem'``: after the max-pool;
* a block name, e.g. ``'layer3_0'``: the block's output (after the residual sum and ReLU);
* a stage name, ``'layer1'``..``'layer4'``: the output of the stage's last block.
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


def scaled_width(channels: int, multiplier: float) -> int:
    """channels·multiplier rounded half up, at least 1."""
    return max(1, int(channels * multiplier + 0.5))


class ResidualBlock(nn.Module):
    """One block of the graph (`graph.BlockSpec`): its convs, each followed by BN (and ReLU where the spec says),
    plus the identity or the downsample conv + BN as the shortcut, then the residual sum and a ReLU.

    Returns (output, {conv name: the conv's tap value}), the tap value being the BN output after its ReLU where the
    network applies one right there."""

    spec: graph.BlockSpec
    width_multiplier: float = 1.0
    bn_updates: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)

        def conv_bn(y, c: graph.ConvSpec):
            width = scaled_width(c.planes, self.width_multiplier) * c.expansion
            y = conv(width, c.kernel_size, c.stride, c.dilation, name=c.name)(y)
            y = norm(name=c.bn)(y, train=train)
            return nn.relu(y) if c.relu else y

        outs = {}
        y = x
        for c in self.spec.convs:
            y = outs[c.name] = conv_bn(y, c)
        shortcut = x
        if self.spec.shortcut is not None:
            shortcut = outs[self.spec.shortcut.name] = conv_bn(x, self.spec.shortcut)
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
    """

    depth: int = 50
    width_multiplier: float = 1.0
    output_stride: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_updates: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, taps: Sequence[str] = ()):
        """Features [B, H/os, W/os, C]; with ``taps``, (features, {tap: array})."""
        block_specs = graph.blocks(self.depth, self.output_stride)
        if self.width_multiplier <= 0:
            raise ValueError(
                f"width_multiplier must be > 0, got {self.width_multiplier!r} (config model.width_multiplier)"
            )
        if x.ndim != 4:
            raise ValueError(f"ResNetD expects NHWC images [B,H,W,C], got shape {x.shape}")
        if isinstance(taps, str):
            taps = (taps,)
        valid = graph.tap_names(self.depth)
        unknown = [t for t in taps if t not in valid]
        if unknown:
            raise ValueError(
                f"unknown tap(s) {unknown} for ResNetD-{self.depth}; valid names are conv paths like "
                f"'layer3_0/conv2', blocks like 'layer3_0', stages 'layer1'..'layer4' and 'stem' "
                f"(see mtl_sparse_jax.models.tap_names({self.depth}))"
            )
        width = functools.partial(scaled_width, multiplier=self.width_multiplier)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)

        found: dict[str, jax.Array] = {}
        y = x
        for c in graph.stem_convs():
            y = conv(width(c.planes) * c.expansion, c.kernel_size, c.stride, name=c.name)(y)
            y = found[c.name] = nn.relu(norm(name=c.bn)(y, train=train))
        y = found["stem"] = max_pool_3x3_s2(y)

        for block in block_specs:
            y, outs = ResidualBlock(
                spec=block,
                width_multiplier=self.width_multiplier,
                bn_updates=self.bn_updates,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=block.name,
            )(y, train=train)
            found.update({f"{block.name}/{k}": v for k, v in outs.items()})
            found[block.name] = y
            found[f"layer{block.stage}"] = y

        if not taps:
            return y
        return y, {t: found[t] for t in taps}


ResNetD18 = functools.partial(ResNetD, depth=18)
ResNetD50 = functools.partial(ResNetD, depth=50)
ResNetD101 = functools.partial(ResNetD, depth=101)
resnetd18, resnetd50, resnetd101 = ResNetD18, ResNetD50, ResNetD101
