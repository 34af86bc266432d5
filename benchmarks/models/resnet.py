"""ResNets: ResNet-18 (CIFAR stem), ResNet-50 (ImageNet stem) and pre-activation ResNet-18.

All activations are the sqrt(2)-scaled ReLU; convolutions and the classifier have no bias
and BatchNorm has no affine parameters unless ``bias=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from benchmarks.models.layers import Initializer, batch_norm, conv, linear, scaled_relu


class _Residual(nnx.Module):
    """A block's shortcut: the identity, or a 1x1 conv + BN where the shape changes."""

    def _shortcut(self, in_channels: int, out_channels: int, stride: int, bias: bool, kw) -> None:
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = conv(in_channels, out_channels, (1, 1), strides=stride, **kw)
            self.shortcut_bn = batch_norm(out_channels, bias=bias, rngs=kw["rngs"])
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def _join(self, out: jax.Array, x: jax.Array) -> jax.Array:
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return scaled_relu(out + x)


class BasicBlock(_Residual):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv + BN) shortcut."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        bias: bool,
        kernel_init: Initializer | None,
        rngs: nnx.Rngs,
    ):
        kw = dict(bias=bias, kernel_init=kernel_init, rngs=rngs)
        self.conv1 = conv(in_channels, channels, (3, 3), strides=stride, **kw)
        self.bn1 = batch_norm(channels, bias=bias, rngs=rngs)
        self.conv2 = conv(channels, channels, (3, 3), **kw)
        self.bn2 = batch_norm(channels, bias=bias, rngs=rngs)
        self._shortcut(in_channels, channels, stride, bias, kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = scaled_relu(self.bn1(self.conv1(x)))
        return self._join(self.bn2(self.conv2(out)), x)


class Bottleneck(_Residual):
    """1x1 -> 3x3 (strided, "ResNet v1.5") -> 1x1 conv-BN layers, output ``4 * channels``."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        bias: bool,
        kernel_init: Initializer | None,
        rngs: nnx.Rngs,
    ):
        kw = dict(bias=bias, kernel_init=kernel_init, rngs=rngs)
        out_channels = channels * self.expansion
        self.conv1 = conv(in_channels, channels, (1, 1), **kw)
        self.bn1 = batch_norm(channels, bias=bias, rngs=rngs)
        self.conv2 = conv(channels, channels, (3, 3), strides=stride, **kw)
        self.bn2 = batch_norm(channels, bias=bias, rngs=rngs)
        self.conv3 = conv(channels, out_channels, (1, 1), **kw)
        self.bn3 = batch_norm(out_channels, bias=bias, rngs=rngs)
        self._shortcut(in_channels, out_channels, stride, bias, kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = scaled_relu(self.bn1(self.conv1(x)))
        out = scaled_relu(self.bn2(self.conv2(out)))
        return self._join(self.bn3(self.conv3(out)), x)


class ResNet(nnx.Module):
    """ResNet with four stages of widths ``width * (1, 2, 4, 8)``.

    ``stem="cifar"``: 3x3 stride-1 conv + BN + ReLU, no max pool (for 32x32 inputs).
    ``stem="imagenet"``: 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max pool.
    Ends with global average pooling and a Linear classifier.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_sizes: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        kw = dict(bias=bias, kernel_init=kernel_init, rngs=rngs)
        self.stem = stem
        kernel = (3, 3) if stem == "cifar" else (7, 7)
        self.stem_conv = conv(in_channels, width, kernel, strides=1 if stem == "cifar" else 2, **kw)
        self.stem_bn = batch_norm(width, bias=bias, rngs=rngs)
        channels_in = width
        stages = []
        for i, num_blocks in enumerate(stage_sizes):
            channels = width * 2**i
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(channels_in, channels, stride, **kw))
                channels_in = channels * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.fc = linear(channels_in, num_classes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = scaled_relu(self.stem_bn(self.stem_conv(x)))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for blk in stage:
                x = blk(x)
        return self.fc(x.mean(axis=(1, 2)))


class PreActBlock(nnx.Module):
    """Pre-activation basic block: BN-ReLU-conv twice; 1x1 conv shortcut (no BN) if needed."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        bias: bool,
        kernel_init: Initializer | None,
        rngs: nnx.Rngs,
    ):
        kw = dict(bias=bias, kernel_init=kernel_init, rngs=rngs)
        self.bn1 = batch_norm(in_channels, bias=bias, rngs=rngs)
        self.conv1 = conv(in_channels, channels, (3, 3), strides=stride, **kw)
        self.bn2 = batch_norm(channels, bias=bias, rngs=rngs)
        self.conv2 = conv(channels, channels, (3, 3), **kw)
        if stride != 1 or in_channels != channels:
            self.shortcut_conv = conv(in_channels, channels, (1, 1), strides=stride, **kw)
        else:
            self.shortcut_conv = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = scaled_relu(self.bn1(x))
        shortcut = x if self.shortcut_conv is None else self.shortcut_conv(out)
        out = self.conv1(out)
        out = self.conv2(scaled_relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nnx.Module):
    """Pre-activation ResNet for 32x32 inputs: 3x3 conv stem (no BN), PreActBlocks,
    global average pool, Linear. This is the "resnet18" of the official AGD repository."""

    def __init__(
        self,
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(bias=bias, kernel_init=kernel_init, rngs=rngs)
        self.stem_conv = conv(in_channels, width, (3, 3), **kw)
        channels_in = width
        stages = []
        for i, num_blocks in enumerate(stage_sizes):
            channels = width * 2**i
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(channels_in, channels, stride, **kw))
                channels_in = channels
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.fc = linear(channels_in, num_classes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_conv(x)
        for stage in self.stages:
            for blk in stage:
                x = blk(x)
        return self.fc(x.mean(axis=(1, 2)))


# name: (block, blocks per stage, stem); a block of None is the pre-activation ResNet.
VARIANTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), "cifar"),  # ResNet-18 with the CIFAR stem.
    "resnet50": (Bottleneck, (3, 4, 6, 3), "imagenet"),  # ResNet-50 (v1.5), ImageNet stem.
    "preact_resnet18": (None, (2, 2, 2, 2), None),  # The official AGD repo's CIFAR ResNet-18.
}


def resnet(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: int = 64,
    bias: bool = False,
    kernel_init: Initializer | None = None,
    rngs: nnx.Rngs,
) -> ResNet | PreActResNet:
    """The residual network ``name`` (one of ``VARIANTS``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown ResNet {name!r}; expected one of {tuple(VARIANTS)}")
    block, stages, stem = VARIANTS[name]
    common = dict(num_classes=num_classes, in_channels=in_channels, width=width, bias=bias,
                  kernel_init=kernel_init, rngs=rngs)  # fmt: skip
    if block is None:
        return PreActResNet(stages, **common)
    return ResNet(block, stages, stem=stem, **common)


resnet18 = functools.partial(resnet, "resnet18")
resnet50 = functools.partial(resnet, "resnet50")
preact_resnet18 = functools.partial(resnet, "preact_resnet18")
