"""Layers with PyTorch semantics: convolution, BatchNorm, dense and max-pool.

The paper's network was trained from scratch in PyTorch, and the group-lasso strength λ acts on the norms of
weight groups, so the initial scale of every weight decides what a given λ does. These layers therefore
reproduce PyTorch's defaults rather than Flax's:

* conv and dense kernels *and* biases start as U(±1/√fan_in), fan_in = kh·kw·C_in (PyTorch's
  kaiming_uniform(a=√5) and its bias rule);
* convolutions pad explicitly with zeros, dilation·(k−1)/2 on each side, which matters for the heavily
  dilated ASPP branches on small feature maps; they are computed by ``conv.conv2d``, which gives the same result
  without computing the kernel taps that read only padding;
* BatchNorm uses eps 1e-5 and momentum 0.1 in PyTorch's convention, normalises with the biased batch variance
  in train mode, and stores the *unbiased* one in the running variance;
* max-pooling pads with −inf.

Kernels are HWIO and named ``kernel``; biases are named ``bias``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_sparse_jax.models import conv

Dtype = Any


def uniform_fan_in(fan_in: int):
    """Initializer drawing U(−1/√fan_in, 1/√fan_in), PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def same_padding(kernel_size: int, dilation: int) -> int:
    """Zero padding on each side that keeps the spatial size at stride 1: dilation·(k−1)/2."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd for symmetric padding, got {kernel_size}")
    return dilation * (kernel_size - 1) // 2


class Conv2d(nn.Module):
    """2-D convolution on NHWC inputs with an HWIO ``kernel``, explicit zero padding and PyTorch init.

    Computed by :func:`mtl_sparse_jax.models.conv.conv2d`: taps that read only zero padding for the static input
    size are skipped; the result and both gradients are those of the fully padded convolution, and the kernel
    keeps its full shape.

    Attributes:
      features: number of output channels.
      kernel_size: square kernel side (odd).
      stride: spatial stride.
      dilation: kernel dilation; the padding is dilation·(kernel_size−1)/2 on each side.
      use_bias: add a ``bias`` parameter (the backbone has none).
      dtype: computation dtype; inputs and kernel are cast to it.
      param_dtype: storage dtype of the parameters.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        k = self.kernel_size
        fan_in = k * k * in_features
        kernel = self.param("kernel", uniform_fan_in(fan_in), (k, k, in_features, self.features), self.param_dtype)
        pad = same_padding(k, self.dilation)
        y = conv.conv2d(
            x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride, dilation=self.dilation, padding=pad
        )
        if self.use_bias:
            bias = self.param("bias", uniform_fan_in(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Dense(nn.Module):
    """Fully connected layer with PyTorch's default init (kernel and bias U(±1/√in_features))."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", uniform_fan_in(fan_in), (fan_in, self.features), self.param_dtype)
        bias = self.param("bias", uniform_fan_in(fan_in), (self.features,), self.param_dtype)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's semantics.

    Train mode normalises with the batch mean and the biased batch variance, and (outside ``init``) moves the
    running statistics toward the batch mean and the *unbiased* batch variance n/(n−1)·var, as PyTorch does.
    Eval mode normalises with the running statistics. Statistics are computed in float32 whatever ``dtype`` is.
    Under ``jit`` with the batch sharded over devices, ``jnp.mean`` over the batch axis already yields the
    global-batch statistics, so no ``axis_name`` is needed.

    Attributes:
      momentum: PyTorch-style momentum: running ← (1−momentum)·running + momentum·batch.
      epsilon: added to the variance.
      num_updates: apply the running-statistics update this many times with the same batch statistics, i.e. with
        an effective momentum of 1−(1−momentum)^num_updates. This mimics a network that re-runs a module once per
        task in train mode (the reference's multi-task model); 1 is the ordinary update.
      dtype: output dtype.
      param_dtype: dtype of ``scale`` and ``bias``.

    Parameters ``scale`` (γ, init 1) and ``bias`` (β, init 0); batch_stats ``mean`` (init 0) and ``var`` (init 1).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    num_updates: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            # Two-pass variance: E[(x−μ)²] is better conditioned than E[x²]−μ² for large activations.
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                count = int(np.prod([x.shape[a] for a in axes]))
                # PyTorch refuses count == 1 in train mode; here the correction is skipped instead of dividing by 0.
                unbiased_var = var * (count / max(count - 1, 1))
                keep = (1.0 - self.momentum) ** self.num_updates
                running_mean.value = keep * running_mean.value + (1.0 - keep) * mean
                running_var.value = keep * running_var.value + (1.0 - keep) * unbiased_var
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        y = (x32 - mean) * multiplier + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3×3 max-pool, stride 2, padding 1 with −inf (PyTorch ``MaxPool2d(3, 2, 1)``), NHWC."""
    return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
