"""What the cost benchmark measures: optimizers at fixed settings, and parameter trees (shapes only;
arrays are made per dtype when timed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import agd_optax
from benchmarks.overhead.compile_cost import dense_stack

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
    "prodigy": lambda: optax.contrib.prodigy(),
    "dog": lambda: optax.contrib.dog(),
    # A reference for the cost of norms: SGD after optax's global-norm clipping, which also reads
    # every gradient in a reduction before its elementwise pass.
    "sgd_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
    "agd": lambda: agd_optax.agd(),
    "agd_momentum": lambda: agd_optax.agd_momentum(),
}
BASELINE = "sgd"


def _pure_param_shapes(model_fn: Callable[[], Any]) -> dict:
    """The parameter shapes of an NNX model built abstractly (no memory, no compute)."""
    from flax import nnx

    abstract = nnx.eval_shape(model_fn)
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def resnet18_cifar() -> dict:
    from flax import nnx

    from benchmarks.models import make_model

    return _pure_param_shapes(
        lambda: make_model("resnet18", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    )


def resnet50_imagenet() -> dict:
    from flax import nnx

    from benchmarks.models import make_model

    return _pure_param_shapes(
        lambda: make_model(
            "resnet50", num_classes=1000, input_shape=(224, 224, 3), rngs=nnx.Rngs(0)
        )
    )


def gpt2_small(
    layers: int = 12, d: int = 768, heads: int = 12, vocab: int = 50257, context: int = 1024
) -> dict:
    """GPT-2 small's parameters with Flax names, so AGD infers every role: token and position
    ``embedding`` tables (the output layer is tied to the token table), attention ``query``,
    ``key``, ``value`` kernels ``(d, heads, head_dim)`` and ``out`` kernel ``(heads, head_dim, d)``
    as in ``DenseGeneral``/``LinearGeneral``, MLP ``kernel``/``bias``, LayerNorm ``scale``/``bias``."""
    f32 = jnp.float32
    s = lambda *shape: jax.ShapeDtypeStruct(shape, f32)  # noqa: E731
    hd = d // heads

    def layer_norm():
        return {"scale": s(d), "bias": s(d)}

    def block():
        attn = {
            name: {"kernel": s(d, heads, hd), "bias": s(heads, hd)}
            for name in ("query", "key", "value")
        }
        attn["out"] = {"kernel": s(heads, hd, d), "bias": s(d)}
        return {
            "ln_1": layer_norm(),
            "attn": attn,
            "ln_2": layer_norm(),
            "mlp": {
                "fc": {"kernel": s(d, 4 * d), "bias": s(4 * d)},
                "proj": {"kernel": s(4 * d, d), "bias": s(d)},
            },
        }

    return {
        "wte": {"embedding": s(vocab, d)},
        "wpe": {"embedding": s(context, d)},
        "h": {str(i): block() for i in range(layers)},
        "ln_f": layer_norm(),
    }


def tiny_mlp() -> dict:
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return {
        "dense_0": {"kernel": s(32, 64), "bias": s(64)},
        "ln": {"scale": s(64), "bias": s(64)},
        "dense_1": {"kernel": s(64, 10)},
    }


def tiny_cnn() -> dict:
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return {
        "conv_0": {"kernel": s(3, 3, 3, 8)},
        "conv_1": {"kernel": s(3, 3, 8, 16)},
        "head": {"kernel": s(16, 10)},
    }


TREES: dict[str, Callable[[], dict]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet50_imagenet": resnet50_imagenet,
    "gpt2_small": gpt2_small,
    "tiny_mlp": tiny_mlp,
    "tiny_cnn": tiny_cnn,
    # The compile benchmark's trees: dense layers with biases, five shapes repeated.
    "dense_stack_100": lambda: dense_stack(100),
    "dense_stack_500": lambda: dense_stack(500),
}


def num_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
