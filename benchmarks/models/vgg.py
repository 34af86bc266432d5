"""VGG for small (CIFAR-sized) images."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from benchmarks.models.layers import Initializer, batch_norm, conv, linear, scaled_relu

# Channel counts of the 3x3 convolutions; "M" is a 2x2 max pool with stride 2.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


class VGG(nnx.Module):
    """VGG: (conv3x3 -> BatchNorm -> sqrt(2)-ReLU) blocks and max pools, then one Linear.

    With the default ``VGG16_CFG`` and 32x32 inputs the features end at 1x1x512, so the
    classifier is ``Linear(512, num_classes)``. In general the classifier acts on the
    flattened final feature map (``H / 2**pools x W / 2**pools x channels``).
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG16_CFG,
        *,
        num_classes: int,
        input_shape: Sequence[int] = (32, 32, 3),
        bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        if len(input_shape) != 3:
            raise ValueError(f"VGG expects input_shape (H, W, C), got {tuple(input_shape)}")
        height, width, channels = (int(s) for s in input_shape)
        convs, norms = [], []
        for item in cfg:
            if item == "M":
                height, width = height // 2, width // 2
                if height < 1 or width < 1:
                    raise ValueError(
                        f"VGG cfg {tuple(cfg)} has too many pools for input_shape "
                        f"{tuple(input_shape)}"
                    )
            elif isinstance(item, int) and item > 0:
                convs.append(
                    conv(channels, item, (3, 3), bias=bias, kernel_init=kernel_init, rngs=rngs)
                )
                norms.append(batch_norm(item, bias=bias, rngs=rngs))
                channels = item
            else:
                raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {item!r}")
        self.cfg = tuple(cfg)
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.classifier = linear(
            height * width * channels, num_classes, bias=bias, kernel_init=kernel_init, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for item in self.cfg:
            if item == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = scaled_relu(self.norms[i](self.convs[i](x)))
                i += 1
        return self.classifier(x.reshape(x.shape[0], -1))


def vgg16(
    *,
    num_classes: int,
    input_shape: Sequence[int] = (32, 32, 3),
    width: int = 64,
    bias: bool = False,
    kernel_init: Initializer | None = None,
    rngs: nnx.Rngs,
) -> VGG:
    """VGG-16 (13 convs + 1 Linear). ``width`` rescales all channel counts (64 = standard)."""
    cfg = tuple(v if v == "M" else max(1, int(v) * width // 64) for v in VGG16_CFG)
    return VGG(
        cfg,
        num_classes=num_classes,
        input_shape=input_shape,
        bias=bias,
        kernel_init=kernel_init,
        rngs=rngs,
    )
