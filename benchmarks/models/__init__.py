"""Flax NNX models for the AGD benchmarks, and the ``ARCHITECTURES`` table read by ``make_model``.

All models take NHWC images (FCN flattens any input; CNN1D takes ``(N, L, C)``), use the
sqrt(2)-scaled ReLU, and by default have no biases and affine-free BatchNorm. BatchNorm
layers start in training mode; use ``model.train()`` / ``model.eval()`` to switch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

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
from benchmarks.models.transformer import make_transformer
from benchmarks.models.vgg import VGG, VGG16_CFG, vgg16

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "ARCHS",
    "Architecture",
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


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture: ``build(input_shape, depth, width, **common)`` where ``common`` holds
    ``num_classes``, ``bias``, ``kernel_init`` and ``rngs``; ``input_shape`` has been checked to
    have one of ``ranks`` axes."""

    build: Callable[..., nnx.Module]
    description: str
    ranks: tuple[int, ...]  # Axes of one example: 1 or 2 (sequences, any), 3 (images HWC).
    fixed_depth: int | None = None  # depth is this or None; otherwise depth is a setting.
    task: str = "classification"  # Or "language": next-token logits over the vocabulary.
    options: tuple[str, ...] = ()  # Keyword options of build; the same-named Config fields.
    losses: tuple[str, ...] = ("mse", "xent")  # The losses it may be trained with.


def _fcn(input_shape, depth, width, **common):
    if depth is None or width is None:
        raise ValueError(f"arch 'fcn' needs depth and width, got depth={depth}, width={width}")
    return FCN(math.prod(input_shape), width=width, depth=depth, **common)


def _cnn1d(input_shape, depth, width, **common):
    channels = input_shape[1] if len(input_shape) == 2 else 1
    width, depth = 32 if width is None else width, 4 if depth is None else depth
    return CNN1D(input_shape[0], channels, width=width, depth=depth, **common)


def _image(factory):
    def build(input_shape, depth, width, **common):
        return factory(input_shape=input_shape, width=64 if width is None else width, **common)

    return build


def _resnet(factory):
    def build(input_shape, depth, width, **common):
        width = 64 if width is None else width
        return factory(in_channels=input_shape[-1], width=width, **common)

    return build


def _transformer(input_shape, depth, width, *, num_classes, kernel_init, **options):
    if kernel_init is not None:
        raise ValueError("arch 'transformer' has its own initialisers (init='agd' or 'gpt2')")
    return make_transformer(
        num_classes, context=input_shape[0], depth=depth, width=width, **options
    )


ANY_RANK = (1, 2, 3, 4)
ARCHITECTURES: dict[str, Architecture] = {
    "fcn": Architecture(_fcn, "fully connected; --depth Linear layers of --width", ANY_RANK),
    "cnn1d": Architecture(_cnn1d, "1-D convnet; --depth - 1 convs of --width channels", (1, 2)),
    "vgg16": Architecture(_image(vgg16), "VGG-16 (--width: first stage's channels)", (3,), 16),
    "resnet18": Architecture(_resnet(resnet18), "ResNet-18 (--width: base channels)", (3,), 18),
    "preact_resnet18": Architecture(_resnet(preact_resnet18), "pre-activation ResNet-18", (3,), 18),
    "resnet50": Architecture(_resnet(resnet50), "ResNet-50 (bottleneck blocks)", (3,), 50),
    "transformer": Architecture(
        _transformer,
        "decoder-only language model (--depth blocks of --width, --heads, --context)",
        (1,),
        task="language",
        options=("heads", "tied", "scan_layers"),
        losses=("xent",),
    ),
}
ARCHS = tuple(ARCHITECTURES)
ALIASES = {"vgg": "vgg16"}


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
    **options,
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
      **options: the architecture's own options (``Architecture.options``; the transformer's
        ``heads``, ``tied``, ``scan_layers``, and ``init``: ``"agd"`` or ``"gpt2"``).

    Raises:
      ValueError: unknown ``arch`` or options that do not fit it.
    """
    name = ALIASES.get(arch.lower(), arch.lower()) if isinstance(arch, str) else arch
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)} (or 'vgg')")
    spec = ARCHITECTURES[name]
    input_shape = tuple(int(s) for s in input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width is not None and width < 1:
        raise ValueError(f"width must be >= 1, got {width} for arch {arch!r}")
    if spec.fixed_depth is not None and depth not in (None, spec.fixed_depth):
        raise ValueError(
            f"arch {name!r} has fixed depth {spec.fixed_depth}; got depth={depth} (pass depth=None)"
        )
    if len(input_shape) not in spec.ranks:
        expected = " or ".join(f"{r} axes" for r in spec.ranks)
        hint = (
            " (H, W, C)"
            if spec.ranks == (3,)
            else " (L,) or (L, C)"
            if spec.ranks == (1, 2)
            else ""
        )
        raise ValueError(f"arch {name!r} expects input_shape{hint}: {expected}, got {input_shape}")
    unknown = sorted(
        set(options) - set(spec.options) - ({"init"} if spec.task == "language" else set())
    )
    if unknown:
        raise ValueError(f"arch {name!r} takes no options {unknown} (its options: {spec.options})")
    common = dict(num_classes=num_classes, bias=bias, kernel_init=kernel_init, rngs=rngs)
    return spec.build(input_shape, depth, width, **common, **options)
