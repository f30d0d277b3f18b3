"""One description of the ResNetD graph: stages, blocks, convs in forward order, taps, and which node feeds which.

The Flax model (`resnetd.ResNetD`), the names that sparsity and plots use (`conv_paths`, `tap_names`,
`block_names`), compaction (`nodes`: the graph as a list of conv / add / maxpool nodes) and heads attached at
taps all derive from `blocks(depth, output_stride)` here, so a change to the architecture is made once.

Structure (ResNetD-50 at output stride 8, 256×256 input):

* stem: 3×3 conv stride 2 (3→64), 3×3 conv (64→64), 3×3 conv (64→128), each followed by BN and ReLU, then a
  3×3 stride-2 max-pool padded with −inf → 128 channels at H/4;
* four stages of bottleneck blocks (expansion 4) with planes 64/128/256/512 and [3,4,6,3] blocks
  ([3,4,23,3] for depth 101; depth 18 uses two basic blocks per stage, expansion 1);
* a bottleneck block is conv1 1×1, bn1, ReLU; conv2 3×3 (stride, dilation, padding = dilation), bn2, ReLU;
  conv3 1×1, bn3; plus the identity or ``downsample_conv`` (1×1, strided) + ``downsample_bn``; then ReLU.
  A basic block is conv1 3×3 (stride, dilation), bn1, ReLU; conv2 3×3 (dilation), bn2; plus the shortcut; ReLU;
* block 0 of every stage has the downsample shortcut, and block 0 of a dilated stage is dilated too.
"""

from __future__ import annotations

import dataclasses
import difflib

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
STEM_STRIDES = (2, 1, 1)
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv + BN (+ ReLU) of a block: module names inside the block, size, stride, dilation, widths."""

    name: str  # 'conv1', 'conv2', 'conv3' or 'downsample_conv'
    bn: str  # 'bn1', ... or 'downsample_bn'
    kernel_size: int
    stride: int
    dilation: int
    planes: int  # unscaled width; the output width is scaled_width(planes, multiplier) * expansion
    relu: bool  # a ReLU right after the BN (not for the block's last conv or the downsample)
    expansion: int = 1


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: its name ('layer<s>_<b>'), kind, stride, dilation, planes and convs in forward order."""

    name: str
    stage: int
    kind: str  # 'basic' | 'bottleneck'
    planes: int
    stride: int
    dilation: int
    downsample: bool
    convs: tuple[ConvSpec, ...]  # main path, in forward order
    shortcut: ConvSpec | None  # the downsample conv, or None for the identity

    @property
    def conv_names(self) -> tuple[str, ...]:
        """Module names of its convs in forward order, downsample last."""
        return tuple(c.name for c in self.convs) + ((self.shortcut.name,) if self.shortcut else ())


@dataclasses.dataclass(frozen=True)
class Node:
    """One step of the backbone graph: 'input', 'conv' (conv + BN [+ ReLU]), 'add' (residual sum + ReLU),
    'maxpool', 'output'. ``inputs`` are node names; a conv is named by its module path ('layer1_0/conv1')."""

    name: str
    kind: str
    inputs: tuple[str, ...] = ()
    bn: str = ""
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    relu: bool = False


def check_depth(depth: int) -> tuple[str, tuple[int, ...]]:
    """(block kind, blocks per stage) of a ResNetD depth; ValueError naming config model.depth otherwise."""
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"ResNetD depth must be one of {sorted(STAGE_BLOCKS)}, got {depth!r} (config model.depth)")
    return STAGE_BLOCKS[depth]


def check_output_stride(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stage strides, stage dilations) of an output stride; ValueError naming config model.output_stride."""
    if output_stride not in STRIDES_AND_DILATIONS:
        raise ValueError(
            f"output_stride must be one of {sorted(STRIDES_AND_DILATIONS)}, got {output_stride!r} "
            "(config model.output_stride)"
        )
    return STRIDES_AND_DILATIONS[output_stride]


def blocks(depth: int, output_stride: int = 8) -> tuple[BlockSpec, ...]:
    """Every residual block of ResNetD-`depth` in forward order, with its convs."""
    kind, counts = check_depth(depth)
    strides, dilations = check_output_stride(output_stride)
    out = []
    for s, (n, stage_stride, dilation, planes) in enumerate(zip(counts, strides, dilations, STAGE_PLANES), start=1):
        for b in range(n):
            stride = stage_stride if b == 0 else 1
            if kind == "bottleneck":
                convs = (
                    ConvSpec("conv1", "bn1", 1, 1, 1, planes, True),
                    ConvSpec("conv2", "bn2", 3, stride, dilation, planes, True),
                    ConvSpec("conv3", "bn3", 1, 1, 1, planes, False, EXPANSION[kind]),
                )
            else:
                convs = (
                    ConvSpec("conv1", "bn1", 3, stride, dilation, planes, True),
                    ConvSpec("conv2", "bn2", 3, 1, dilation, planes, False),
                )
            shortcut = (
                ConvSpec("downsample_conv", "downsample_bn", 1, stride, 1, planes, False, EXPANSION[kind])
                if b == 0
                else None
            )
            out.append(BlockSpec(f"layer{s}_{b}", s, kind, planes, stride, dilation, b == 0, convs, shortcut))
    return tuple(out)


def stem_convs() -> tuple[ConvSpec, ...]:
    """The three stem convs (module names 'stem_conv<i>' / 'stem_bn<i>'), each with BN and ReLU."""
    return tuple(
        ConvSpec(f"stem_conv{i}", f"stem_bn{i}", 3, stride, 1, width, True)
        for i, (width, stride) in enumerate(zip(STEM_WIDTHS, STEM_STRIDES), start=1)
    )


def block_names(depth: int) -> list[str]:
    """Block names ``layer<s>_<b>`` in forward order."""
    return [b.name for b in blocks(depth)]


def conv_paths(depth: int) -> list[str]:
    """Every conv of the backbone as a '/'-joined module path, in forward order (downsample last in its block)."""
    paths = [c.name for c in stem_convs()]
    for block in blocks(depth):
        paths += [f"{block.name}/{c}" for c in block.conv_names]
    return paths


def tap_names(depth: int) -> list[str]:
    """Every valid tap name, in forward order: convs, 'stem', blocks and stages."""
    names = [c.name for c in stem_convs()] + ["stem"]
    for block in blocks(depth):
        names += [f"{block.name}/{c}" for c in block.conv_names] + [block.name]
    names += [f"layer{s}" for s in (1, 2, 3, 4)]
    return names


def check_taps(depth: int, taps) -> None:
    """ValueError naming the first unknown tap and the closest valid name, unless every tap is in `tap_names`."""
    valid = tap_names(depth)
    for t in taps:
        if t not in valid:
            close = difflib.get_close_matches(t, valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"unknown tap {t!r} for ResNetD-{depth}; {hint}valid names are conv paths like 'layer3_0/conv2', "
                f"blocks like 'layer3_0', stages 'layer1'..'layer4' and 'stem' (see mtl_sparse_jax.models.tap_names)"
            )


def candidate_convs(depth: int) -> list[str]:
    """The block convs (conv1, conv2[, conv3] of every block) in forward order: the convs whose activity decides a
    LOMT tap. Stem and downsample convs are left out, as in the LOMT reference."""
    return [f"{b.name}/{c.name}" for b in blocks(depth) for c in b.convs]


def tap_node(depth: int, tap: str) -> str:
    """The graph node a tap reads: a stage name 'layer<s>' is its last block, every other tap is a node itself."""
    if tap in ("layer1", "layer2", "layer3", "layer4"):
        return [b.name for b in blocks(depth) if b.stage == int(tap[-1])][-1]
    return tap


def ancestors(depth: int, output_stride: int, taps) -> set[str]:
    """The nodes the taps' values depend on, their own nodes included: what a backbone truncated to these taps
    must compute. The 'input' node is left out."""
    by_name = {n.name: n for n in nodes(depth, output_stride)}
    todo = [tap_node(depth, t) for t in taps]
    out: set[str] = set()
    while todo:
        name = todo.pop()
        if name in out or name == "input":
            continue
        out.add(name)
        todo.extend(by_name[name].inputs)
    return out


def nodes(depth: int, output_stride: int) -> list[Node]:
    """The backbone as a list of nodes in forward order, with the module names of its convs and BNs."""
    out = [Node("input", "input")]
    prev = "input"
    for c in stem_convs():
        out.append(Node(c.name, "conv", (prev,), c.bn, c.kernel_size, c.stride, c.dilation, c.relu))
        prev = c.name
    out.append(Node("stem", "maxpool", (prev,)))
    prev = "stem"
    for block in blocks(depth, output_stride):
        source = prev
        for c in block.convs:
            path = f"{block.name}/{c.name}"
            out.append(Node(path, "conv", (prev,), f"{block.name}/{c.bn}", c.kernel_size, c.stride, c.dilation, c.relu))
            prev = path
        main = prev
        shortcut = source
        if block.shortcut is not None:
            c = block.shortcut
            shortcut = f"{block.name}/{c.name}"
            out.append(
                Node(shortcut, "conv", (source,), f"{block.name}/{c.bn}", c.kernel_size, c.stride, c.dilation, c.relu)
            )
        out.append(Node(block.name, "add", (main, shortcut)))
        prev = block.name
    out.append(Node("features", "output", (prev,)))
    return out
