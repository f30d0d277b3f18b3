"""Task heads of the paper: a DeepLab-v3 head for dense tasks and a small classification head for attributes.

Both return raw pre-activation outputs; activations, losses and target resizing are the tasks' business.

DeepLab-v3 head (reference ``DeepLabHead``/``ASPP``), on features [B, h, w, C_in]:

* ASPP, five branches of ``channels`` each (module ``<branch>_conv`` then ``<branch>_bn``):
  ``aspp_conv1x1`` 1×1, BN, ReLU, Dropout; ``aspp_rate<r>`` 3×3 with dilation and zero padding r, BN, ReLU
  (for each rate, default 12/24/36); ``aspp_pool``: global average pool, 1×1, BN, ReLU, broadcast back to h×w
  (bilinear upsampling of a 1×1 map is a broadcast);
* concat → ``aspp_project`` 1×1, BN, ReLU, Dropout;
* ``head`` 3×3 to ``channels``, BN, ReLU; ``classifier`` 1×1 with bias to ``out_channels``.

Only ``classifier`` has a bias. No upsampling: the output is [B, h, w, out_channels]. Every conv goes through
``layers.Conv2d``, which skips the kernel taps that read only padding (on an 8×8 map every ASPP branch of rate
≥ 8 is its centre tap) with the same result as the fully padded conv.

Classification head (reference ``ClassificationHead``): ``conv`` 3×3 with bias to ``hidden``, ReLU, 2×2 stride-2
max-pool (floor), global average pool, Dropout(0.6), ``dense1`` to ``dense``, ReLU, Dropout(0.4), ``dense2`` to 1.
It returns the logit [B]; the reference applied a sigmoid inside the head and another in its loss, here the loss
applies exactly one.

Dropout draws from the ``'dropout'`` rng, and only when ``train=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_sparse_jax.models.layers import BatchNorm, Conv2d, Dense

Dtype = Any


class DeepLabHead(nn.Module):
    """DeepLab-v3 head (ASPP + 3×3 conv + 1×1 classifier with bias), no upsampling.

    Attributes:
      out_channels: number of outputs per pixel.
      rates: dilation rates of the three 3×3 ASPP branches.
      channels: width of every ASPP branch, of the projection and of the 3×3 conv (256 in the paper).
      dropout: dropout rate after the ASPP 1×1 branch and after the projection.
      dtype: computation dtype.
      param_dtype: storage dtype of the parameters.
    """

    out_channels: int
    rates: Sequence[int] = (12, 24, 36)
    channels: int = 256
    dropout: float = 0.3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = functools.partial(Conv2d, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
        if x.ndim != 4:
            raise ValueError(f"DeepLabHead expects features [B,h,w,C], got shape {x.shape}")
        c = self.channels

        def conv_bn_relu(y, kernel_size, dilation, name):
            y = conv(c, kernel_size, 1, dilation, name=f"{name}_conv")(y)
            return nn.relu(norm(name=f"{name}_bn")(y, train=train))

        branches = [nn.Dropout(self.dropout, deterministic=not train)(conv_bn_relu(x, 1, 1, "aspp_conv1x1"))]
        for rate in self.rates:
            branches.append(conv_bn_relu(x, 3, rate, f"aspp_rate{rate}"))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        pooled = conv_bn_relu(pooled, 1, 1, "aspp_pool")
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (c,)))

        y = jnp.concatenate([b.astype(self.dtype) for b in branches], axis=-1)
        y = conv_bn_relu(y, 1, 1, "aspp_project")
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = conv_bn_relu(y, 3, 1, "head")
        return conv(self.out_channels, 1, use_bias=True, name="classifier")(y)


class ClassificationHead(nn.Module):
    """Binary attribute head returning one logit per image, shape [B].

    Attributes:
      hidden: channels of the 3×3 conv (64 in the paper).
      dense: width of the hidden dense layer (32 in the paper).
      dropout: rates of the two dropouts, before ``dense1`` and before ``dense2``.
      dtype: computation dtype.
      param_dtype: storage dtype of the parameters.
    """

    hidden: int = 64
    dense: int = 32
    dropout: tuple[float, float] = (0.6, 0.4)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(
                f"ClassificationHead needs features [B,h,w,C] with h,w >= 2 for its 2x2 max-pool, got {x.shape}; "
                "use a larger input image or a smaller output_stride"
            )
        y = Conv2d(self.hidden, 3, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        y = nn.relu(y)
        y = nn.max_pool(y, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        y = jnp.mean(y.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        y = nn.Dropout(self.dropout[0], deterministic=not train)(y)
        y = nn.relu(Dense(self.dense, dtype=self.dtype, param_dtype=self.param_dtype, name="dense1")(y))
        y = nn.Dropout(self.dropout[1], deterministic=not train)(y)
        y = Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="dense2")(y)
        return y[:, 0]
