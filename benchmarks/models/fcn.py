"""Fully connected network and a small 1-D CNN (for MNIST-1D)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from benchmarks.models.layers import Initializer, conv, linear, scaled_relu


class FCN(nnx.Module):
    """Multilayer perceptron: ``depth`` Linear layers, sqrt(2)-ReLU between them.

    Layers are ``in_features -> width``, ``depth - 2`` times ``width -> width``, then
    ``width -> num_classes``. Inputs of any shape ``(N, ...)`` are flattened.
    """

    def __init__(
        self,
        in_features: int,
        *,
        width: int,
        depth: int,
        num_classes: int,
        bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if depth < 2:
            raise ValueError(f"FCN needs depth >= 2 (input and output layers), got depth={depth}")
        if width < 1:
            raise ValueError(f"FCN needs width >= 1, got width={width}")
        dims = [in_features] + [width] * (depth - 1) + [num_classes]
        self.layers = nnx.List(
            [
                linear(d_in, d_out, bias=bias, kernel_init=kernel_init, rngs=rngs)
                for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        n = len(self.layers)
        for i in range(n - 1):
            x = scaled_relu(self.layers[i](x))
        return self.layers[n - 1](x)


class CNN1D(nnx.Module):
    """Small 1-D CNN for MNIST-1D style signals, input ``(N, L, C)`` or ``(N, L)``.

    ``depth - 1`` convolutions (kernel ``kernel_size``, stride 2, ``width`` channels,
    sqrt(2)-ReLU), each halving the length (rounding up), then a Linear classifier on
    the flattened features. No normalisation layers.
    """

    def __init__(
        self,
        length: int,
        in_channels: int = 1,
        *,
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        kernel_size: int = 5,
        bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if depth < 2:
            raise ValueError(f"CNN1D needs depth >= 2 (one conv and the classifier), got {depth}")
        convs = []
        channels = in_channels
        for _ in range(depth - 1):
            convs.append(
                conv(
                    channels,
                    width,
                    (kernel_size,),
                    strides=2,
                    bias=bias,
                    kernel_init=kernel_init,
                    rngs=rngs,
                )
            )
            channels = width
            length = math.ceil(length / 2)
        self.convs = nnx.List(convs)
        self.classifier = linear(
            length * channels, num_classes, bias=bias, kernel_init=kernel_init, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        for layer in self.convs:
            x = scaled_relu(layer(x))
        return self.classifier(x.reshape(x.shape[0], -1))
