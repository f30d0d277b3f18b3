"""Dilated ResNet-D backbone (deep stem, stride in the 3×3 conv) as the paper's reference code defines it.

Structure (ResNetD-50 at output stride 8, 256×256 input):

* stem: 3×3 conv stride 2 (3→64), 3×3 conv (64→64), 3×3 conv (64→128), each followed by BN and ReLU, then a
  3×3 stride-2 max-pool padded with −inf → 128 channels at H/4;
* four stages of bottleneck blocks (expansion 4) with planes 64/128/256/512 and [3,4,6,3] blocks
  ([3,4,23,3] for depth 101; depth 18 uses two basic blocks per stage, expansion 1);
* a bottleneck block is conv1 1×1, bn1, ReLU; conv2 3×3 (stride, dilation, padding = dilation), bn2, ReLU;
  conv3 1×1, bn3; plus the identity or ``downsample_conv`` (1×1, strided) + ``downsample_bn``; then ReLU.
  A basic block is conv1 3×3 (stride, dilation), bn1, ReLU; conv2 3×3 (dilation), bn2; plus the shortcut; ReLU;
* block 0 of every stage has the downsample shortcut, and block 0 of a dilated stage is dilated too.

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

from mtl_sparse_jax.models.layers import BatchNorm, Conv2d, max_pool_3x3_s2

Dtype = Any

# depth → (block kind, blocks per stage)
STAGE_BLOCKS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
# output stride → (stage strides, stage dilations)
STRIDES_AND_DILATIONS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}
STEM_WIDTHS = (64, 64, 128)
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def scaled_width(channels: int, multiplier: float) -> int:
    """channels·multiplier rounded half up, at least 1."""
    return max(1, int(channels * multiplier + 0.5))


def _check_depth(depth: int) -> tuple[str, tuple[int, ...]]:
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"ResNetD depth must be one of {sorted(STAGE_BLOCKS)}, got {depth!r} (config model.depth)")
    return STAGE_BLOCKS[depth]


def block_names(depth: int) -> list[str]:
    """Block names ``layer<s>_<b>`` in forward order."""
    _, blocks = _check_depth(depth)
    return [f"layer{s + 1}_{b}" for s, n in enumerate(blocks) for b in range(n)]


def conv_paths(depth: int) -> list[str]:
    """Every conv of the backbone as a '/'-joined module path, in forward order (downsample last in its block)."""
    kind, _ = _check_depth(depth)
    own = ("conv1", "conv2", "conv3") if kind == "bottleneck" else ("conv1", "conv2")
    paths = [f"stem_conv{i}" for i in (1, 2, 3)]
    for name in block_names(depth):
        paths += [f"{name}/{c}" for c in own]
        if name.endswith("_0"):
            paths.append(f"{name}/downsample_conv")
    return paths


def tap_names(depth: int) -> list[str]:
    """Every valid tap name, in forward order: convs, 'stem', blocks and stages."""
    names = [f"stem_conv{i}" for i in (1, 2, 3)] + ["stem"]
    convs = conv_paths(depth)
    for name in block_names(depth):
        names += [p for p in convs if p.startswith(name + "/")] + [name]
    names += [f"layer{s}" for s in (1, 2, 3, 4)]
    return names


class BottleneckBlock(nn.Module):
    """1×1 → 3×3 (stride, dilation) → 1×1 (×4) with BN after each conv, identity or 1×1+BN shortcut, ReLU."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    bn_updates: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)
        outs = {}
        y = conv(self.planes, 1, name="conv1")(x)
        y = outs["conv1"] = nn.relu(norm(name="bn1")(y, train=train))
        y = conv(self.planes, 3, self.stride, self.dilation, name="conv2")(y)
        y = outs["conv2"] = nn.relu(norm(name="bn2")(y, train=train))
        y = conv(self.planes * 4, 1, name="conv3")(y)
        y = outs["conv3"] = norm(name="bn3")(y, train=train)
        shortcut = x
        if self.downsample:
            shortcut = conv(self.planes * 4, 1, self.stride, name="downsample_conv")(x)
            shortcut = outs["downsample_conv"] = norm(name="downsample_bn")(shortcut, train=train)
        return nn.relu(y + shortcut.astype(y.dtype)), outs


class BasicBlock(nn.Module):
    """3×3 (stride, dilation) → 3×3 (dilation) with BN after each conv, identity or 1×1+BN shortcut, ReLU."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    bn_updates: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)
        outs = {}
        y = conv(self.planes, 3, self.stride, self.dilation, name="conv1")(x)
        y = outs["conv1"] = nn.relu(norm(name="bn1")(y, train=train))
        y = conv(self.planes, 3, 1, self.dilation, name="conv2")(y)
        y = outs["conv2"] = norm(name="bn2")(y, train=train)
        shortcut = x
        if self.downsample:
            shortcut = conv(self.planes, 1, self.stride, name="downsample_conv")(x)
            shortcut = outs["downsample_conv"] = norm(name="downsample_bn")(shortcut, train=train)
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
        kind, blocks = _check_depth(self.depth)
        if self.output_stride not in STRIDES_AND_DILATIONS:
            raise ValueError(
                f"output_stride must be one of {sorted(STRIDES_AND_DILATIONS)}, got {self.output_stride!r} "
                "(config model.output_stride)"
            )
        if self.width_multiplier <= 0:
            raise ValueError(
                f"width_multiplier must be > 0, got {self.width_multiplier!r} (config model.width_multiplier)"
            )
        if x.ndim != 4:
            raise ValueError(f"ResNetD expects NHWC images [B,H,W,C], got shape {x.shape}")
        if isinstance(taps, str):
            taps = (taps,)
        valid = tap_names(self.depth)
        unknown = [t for t in taps if t not in valid]
        if unknown:
            raise ValueError(
                f"unknown tap(s) {unknown} for ResNetD-{self.depth}; valid names are conv paths like "
                f"'layer3_0/conv2', blocks like 'layer3_0', stages 'layer1'..'layer4' and 'stem' "
                f"(see mtl_sparse_jax.models.tap_names({self.depth}))"
            )
        strides, dilations = STRIDES_AND_DILATIONS[self.output_stride]
        width = functools.partial(scaled_width, multiplier=self.width_multiplier)
        norm = functools.partial(BatchNorm, num_updates=self.bn_updates, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        block_cls = BottleneckBlock if kind == "bottleneck" else BasicBlock

        found: dict[str, jax.Array] = {}
        y = x
        for i, (c, stride) in enumerate(zip(STEM_WIDTHS, (2, 1, 1)), start=1):
            y = conv(width(c), 3, stride, name=f"stem_conv{i}")(y)
            y = found[f"stem_conv{i}"] = nn.relu(norm(name=f"stem_bn{i}")(y, train=train))
        y = found["stem"] = max_pool_3x3_s2(y)

        for s, (n, stride, dilation, planes) in enumerate(zip(blocks, strides, dilations, STAGE_PLANES), start=1):
            for b in range(n):
                name = f"layer{s}_{b}"
                y, outs = block_cls(
                    planes=width(planes),
                    stride=stride if b == 0 else 1,
                    dilation=dilation,
                    downsample=b == 0,
                    bn_updates=self.bn_updates,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(y, train=train)
                found.update({f"{name}/{k}": v for k, v in outs.items()})
                found[name] = y
            found[f"layer{s}"] = y

        if not taps:
            return y
        return y, {t: found[t] for t in taps}


ResNetD18 = functools.partial(ResNetD, depth=18)
ResNetD50 = functools.partial(ResNetD, depth=50)
ResNetD101 = functools.partial(ResNetD, depth=101)
resnetd18, resnetd50, resnetd101 = ResNetD18, ResNetD50, ResNetD101
