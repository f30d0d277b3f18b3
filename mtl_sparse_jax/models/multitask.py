"""Multi-task network: one shared ResNet-D backbone, run once per step, and one head per task.

Params are ``{'backbone': ..., 'head_<task>': ...}``; ``apply`` returns ``{task: raw_output}`` with dense heads
giving pre-activation maps [B, h, w, C] at feature resolution and classification heads a logit [B], always in
float32. A single-task model is this class with one head.

The reference code re-runs the backbone once per task. Since BN in train mode gives the same activations each
time, the gradients equal those of one shared pass, but each step updated the backbone's BN running statistics T
times (effective momentum 1−0.9^T). ``reference_bn_updates=True`` reproduces that update at no extra cost.

Heads at taps (LOMT): ``taps=(('seg', 'layer3_3/conv1'), ...)`` gives a task's head the backbone's value at that
tap (read at ``tap_point``) instead of the features; its input width is the tap's. When every head has a tap the
backbone is truncated after the deepest one (`ResNetD.outputs`): later layers are neither computed nor in the
params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_sparse_jax.models import graph
from mtl_sparse_jax.models.heads import ClassificationHead, DeepLabHead
from mtl_sparse_jax.models.resnetd import ResNetD, scaled_width

Dtype = Any
HEAD_KINDS = ("deeplab", "classification")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One task head: its task name, kind ('deeplab' or 'classification') and number of outputs.

    A classification head returns one logit per image, so its ``out_channels`` must be 1.
    """

    name: str
    kind: str
    out_channels: int

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str) or "/" in self.name:
            raise ValueError(f"HeadSpec.name must be a non-empty string without '/', got {self.name!r}")
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"HeadSpec {self.name!r}: kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if int(self.out_channels) < 1:
            raise ValueError(f"HeadSpec {self.name!r}: out_channels must be >= 1, got {self.out_channels!r}")
        if self.kind == "classification" and self.out_channels != 1:
            raise ValueError(
                f"HeadSpec {self.name!r}: a classification head returns one logit, so out_channels must be 1, "
                f"got {self.out_channels!r}"
            )


def as_head_spec(spec) -> HeadSpec:
    """A HeadSpec from a HeadSpec, a mapping with its fields, or a (name, kind, out_channels) sequence."""
    if isinstance(spec, HeadSpec):
        return spec
    if isinstance(spec, Mapping):
        return HeadSpec(**spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 3:
        return HeadSpec(*spec)
    raise ValueError(
        f"model heads must be HeadSpec(name, kind, out_channels), a mapping or a 3-tuple of those, got {spec!r}"
    )


def head_param_name(task: str) -> str:
    """Top-level params key of a task's head."""
    return f"head_{task}"


def build_head(
    spec: HeadSpec, head_width_multiplier: float, *, dtype=jnp.float32, param_dtype=jnp.float32, name=None
) -> nn.Module:
    """The head module of a task (DeepLab 256 channels, or classification 64 conv / 32 dense), scaled."""
    hw = head_width_multiplier
    if spec.kind == "deeplab":
        return DeepLabHead(
            out_channels=spec.out_channels,
            channels=scaled_width(256, hw),
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    return ClassificationHead(
        hidden=scaled_width(64, hw), dense=scaled_width(32, hw), dtype=dtype, param_dtype=param_dtype, name=name
    )


class MultiTaskModel(nn.Module):
    """Shared ResNetD backbone (applied once) with one head per ``HeadSpec``.

    Attributes:
      heads: the task heads, in order (``HeadSpec``s; mappings or 3-tuples of their fields are accepted).
      depth: backbone depth (18, 50, 101).
      width_multiplier: backbone width multiplier.
      head_width_multiplier: scales head widths (DeepLab 256 channels; classification 64 conv, 32 dense).
      output_stride: backbone output stride (8, 16, 32).
      dtype: computation dtype; outputs are returned in float32.
      param_dtype: storage dtype of the parameters.
      reference_bn_updates: in train mode, update the backbone's BN running statistics T = len(heads) times, as
        the reference's per-task backbone re-runs did.
      taps: (task, tap name) pairs: those heads read the backbone at the tap; the others read the features.
      tap_point: where a conv tap reads ('relu', 'bn', or 'conv' before BN; see `ResNetD`).
    """

    heads: Sequence[HeadSpec]
    depth: int = 50
    width_multiplier: float = 1.0
    head_width_multiplier: float = 1.0
    output_stride: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    reference_bn_updates: bool = False
    taps: tuple[tuple[str, str], ...] = ()
    tap_point: str = "relu"

    def backbone_conv_paths(self) -> list[str]:
        """The backbone's convs in forward order (`graph.conv_paths`): all of them, or those a backbone truncated
        at the heads' taps keeps."""
        paths = graph.conv_paths(self.depth)
        if not self.taps or len(self.taps) < len(self.heads):
            return paths
        kept = graph.ancestors(self.depth, self.output_stride, [tap for _, tap in self.taps])
        return [p for p in paths if p in kept]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, taps: Sequence[str] = ()):
        """{task: raw output}; with ``taps`` (backbone tap names), ({task: raw output}, {tap: array})."""
        specs = tuple(as_head_spec(s) for s in self.heads)
        if not specs:
            raise ValueError("MultiTaskModel needs at least one HeadSpec (config model.heads / tasks is empty)")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"MultiTaskModel head names must be unique, got {names}")

        head_taps = dict(self.taps)
        unknown = sorted(set(head_taps) - set(names))
        if unknown:
            raise ValueError(f"MultiTaskModel taps name tasks {unknown} that have no head; the heads are {names}")
        truncated = len(head_taps) == len(specs)
        wanted = tuple(dict.fromkeys((*head_taps.values(), *taps)))
        backbone = ResNetD(
            depth=self.depth,
            width_multiplier=self.width_multiplier,
            output_stride=self.output_stride,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_updates=len(specs) if self.reference_bn_updates else 1,
            tap_point=self.tap_point,
            outputs=wanted if truncated else (),
            name="backbone",
        )
        if truncated:
            features, tapped = None, backbone(x, train=train)
        elif wanted:
            features, tapped = backbone(x, train=train, taps=wanted)
        else:
            features, tapped = backbone(x, train=train), {}

        outputs = {}
        for spec in specs:
            head = build_head(
                spec,
                self.head_width_multiplier,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=head_param_name(spec.name),
            )
            inputs = tapped[head_taps[spec.name]] if spec.name in head_taps else features
            outputs[spec.name] = head(inputs, train=train).astype(jnp.float32)

        if taps:
            return outputs, {t: tapped[t] for t in taps}
        return outputs
