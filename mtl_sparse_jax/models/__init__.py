"""The paper's network in Flax linen (NHWC): dilated ResNet-D backbone, DeepLab-v3 and classification heads,
and the multi-task model that shares one backbone pass between all heads."""

from mtl_sparse_jax.models import graph
from mtl_sparse_jax.models.graph import block_names, conv_paths, tap_names
from mtl_sparse_jax.models.heads import ClassificationHead, DeepLabHead
from mtl_sparse_jax.models.layers import BatchNorm, Conv2d, Dense, max_pool_3x3_s2, uniform_fan_in
from mtl_sparse_jax.models.multitask import (
    HEAD_KINDS,
    HeadSpec,
    MultiTaskModel,
    as_head_spec,
    build_head,
    head_param_name,
)
from mtl_sparse_jax.models.resnetd import (
    ResNetD,
    ResNetD18,
    ResNetD50,
    ResNetD101,
    resnetd18,
    resnetd50,
    resnetd101,
    scaled_width,
)

__all__ = [
    "BatchNorm",
    "ClassificationHead",
    "Conv2d",
    "DeepLabHead",
    "Dense",
    "HEAD_KINDS",
    "HeadSpec",
    "MultiTaskModel",
    "ResNetD",
    "ResNetD18",
    "ResNetD50",
    "ResNetD101",
    "as_head_spec",
    "build_head",
    "graph",
    "block_names",
    "conv_paths",
    "head_param_name",
    "max_pool_3x3_s2",
    "resnetd18",
    "resnetd50",
    "resnetd101",
    "scaled_width",
    "tap_names",
    "uniform_fan_in",
]
