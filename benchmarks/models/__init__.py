"""Flax NNX models for the AGD benchmarks, and the ``make_model`` registry.

All models take NHWC images (FCN flattens any input; CNN1D takes ``(N, L, C)``), use the
sqrt(2)-scaled ReLU, and by default have no biases and affine-free BatchNorm. BatchNorm
layers start in training mode; use ``model.train()`` / ``model.eval()`` to switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx

from benchmarks.models.fcn import CNN1D, FCN
from benchmarks.models.layers import BN_EPSILON, BN_MOMENTUM, Initializer, scaled_relu
from benchmarks.models.resnet import (
    BasicBlock,
    Bottleneck,
    PreActBlock,
    PreActResNet,
    ResNet,
    preact_resnet18,
    resnet18,
    resnet50,
)
from benchmarks.models.vgg import VGG, VGG16_CFG, vgg16

__all__ = [
    "ARCHS",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "CNN1D",
    "FCN",
    "VGG",
    "VGG16_CFG",
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "make_model",
    "preact_resnet18",
    "resnet18",
    "resnet50",
    "scaled_relu",
    "vgg16",
]

# Architectures known to ``make_model``; "vgg" is an alias of "vgg16".
ARCHS = ("fcn", "cnn1d", "vgg16", "resnet18", "preact_resnet18", "resnet50")
_ALIASES = {"vgg": "vgg16"}
# Fixed depth of the named architectures: ``depth`` may be None or this value.
_FIXED_DEPTH = {"vgg16": 16, "resnet18": 18, "preact_resnet18": 18, "resnet50": 50}


def make_model(
    arch: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    depth: int | None = None,
    width: int | None = None,
    bias: bool = False,
    rngs: nnx.Rngs,
    kernel_init: Initializer | None = None,
) -> nnx.Module:
    """Build a model by name.

    Args:
      arch: one of ``ARCHS`` (or the alias ``"vgg"``).
      num_classes: number of output logits.
      input_shape: shape of one example without the batch axis, e.g. ``(32, 32, 3)``.
      depth: ``fcn``: number of Linear layers (required, >= 2); ``cnn1d``: convs + 1
        (default 4); vgg16/resnet*: None or the architecture's own depth (16, 18, 50).
      width: ``fcn``: hidden width (required); ``cnn1d``: channels (default 32); vgg16:
        channels of the first stage, others scale with it (default 64); resnet*: base
        channels (default 64).
      bias: biases in Linear/Conv and affine BatchNorm (default False: neither).
      rngs: ``nnx.Rngs`` for parameter initialisation.
      kernel_init: initializer for every Linear/Conv kernel; None = Flax's default.

    Raises:
      ValueError: unknown ``arch`` or options that do not fit it.
    """
    name = _ALIASES.get(arch.lower(), arch.lower()) if isinstance(arch, str) else arch
    if name not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)} (or 'vgg')")
    input_shape = tuple(int(s) for s in input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width is not None and width < 1:
        raise ValueError(f"width must be >= 1, got {width} for arch {arch!r}")
    common = dict(num_classes=num_classes, bias=bias, kernel_init=kernel_init, rngs=rngs)

    if name == "fcn":
        if depth is None or width is None:
            raise ValueError(f"arch 'fcn' needs depth and width, got depth={depth}, width={width}")
        return FCN(math.prod(input_shape), width=width, depth=depth, **common)

    if name == "cnn1d":
        if len(input_shape) not in (1, 2):
            raise ValueError(f"arch 'cnn1d' expects input_shape (L,) or (L, C), got {input_shape}")
        length = input_shape[0]
        channels = input_shape[1] if len(input_shape) == 2 else 1
        return CNN1D(
            length,
            channels,
            width=32 if width is None else width,
            depth=4 if depth is None else depth,
            **common,
        )

    if depth is not None and depth != _FIXED_DEPTH[name]:
        raise ValueError(
            f"arch {name!r} has fixed depth {_FIXED_DEPTH[name]}; got depth={depth} "
            "(pass depth=None)"
        )
    if len(input_shape) != 3:
        raise ValueError(f"arch {name!r} expects input_shape (H, W, C), got {input_shape}")
    width = 64 if width is None else width
    if name == "vgg16":
        return vgg16(input_shape=input_shape, width=width, **common)
    factory = {"resnet18": resnet18, "preact_resnet18": preact_resnet18, "resnet50": resnet50}
    return factory[name](in_channels=input_shape[-1], width=width, **common)
