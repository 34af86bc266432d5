"""Leaf roles: how Automatic Gradient Descent treats each leaf of a parameter tree.

AGD needs, for every weight, its fan-in, its fan-out and its spatial positions. A parameter tree only
holds arrays, so each leaf is given a *role*:

* ``dense(in_axes, out_axes)``: a matrix, or a multi-axis kernel read as the matrix that maps the
  flattened ``in_axes`` to the flattened ``out_axes`` (attention projections stored as 3-axis
  ``LinearGeneral`` / ``DenseGeneral`` kernels).
* ``conv(spatial_axes, in_axis, out_axis, groups)``: a 1-D, 2-D or 3-D convolution kernel (Flax
  stores them as ``(*spatial, in // groups, out)``), grouped and depthwise ones included.
* ``embedding()``: an embedding table ``(num_embeddings, features)``, read as the matrix
  ``features -> num_embeddings`` (the map a tied output head ``x @ table.T`` applies).
* ``bias(owner=None)``: a bias that moves with the weight of its own module.
* ``norm()``: the scale or the offset of a normalisation layer.

Any weight role, and ``norm``, may carry ``stack_axes``: axes along which independent layers are
stacked (``nnx.scan`` / ``nn.scan``, ``nnx.vmap``), each slice counting as one layer.

Roles are read from the computation (:func:`agd_optax.trace_roles`), from NNX module types
(:func:`agd_optax.nnx_roles`), from a PyTorch-layout tree (:func:`agd_optax.pytorch_roles`), from
Flax's names where those decide them (:func:`agd_optax.infer_roles`, the default), or given to
:func:`agd_optax.agd` as a pytree, a prefix pytree, or a callable returning one, the way
``optax.partition`` takes its labels. A leaf whose role cannot be decided is an error naming its
path, never a guess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Role",
    "RoleError",
    "bias",
    "conv",
    "dense",
    "embedding",
    "norm",
]

_WEIGHT_KINDS = ("dense", "conv", "embedding")
_KINDS = (*_WEIGHT_KINDS, "bias", "norm")
_HELP = (
    "Give its role explicitly: agd(roles=...) takes a pytree, a prefix pytree or a callable of "
    "agd_optax.dense(), conv(), embedding(), bias() or norm(); agd_optax.trace_roles and "
    "agd_optax.nnx_roles read the roles off the model."
)


class RoleError(ValueError):
    """A leaf's AGD role is missing, ambiguous or does not fit the leaf.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> try:
      ...   agd_optax.agd().init({"conv": {"kernel": jnp.zeros((3, 3, 1, 8))}})  # Depthwise?
      ... except agd_optax.RoleError as e:
      ...   print("RoleError:", str(e).splitlines()[3].strip()[:26])
      RoleError: 'conv/kernel' (3, 3, 1, 8)
    """


@dataclasses.dataclass(frozen=True)
class Role:
    """How AGD treats one leaf. Build it with :func:`dense`, :func:`conv`, :func:`embedding`,
    :func:`bias` or :func:`norm` rather than directly.

    Attributes:
      kind: one of ``"dense"``, ``"conv"``, ``"embedding"``, ``"bias"``, ``"norm"``.
      in_axes: fan-in axes (weights), negative axes allowed.
      out_axes: fan-out axes (weights).
      spatial_axes: kernel positions of a convolution; ``None`` means every axis that is not a fan-in,
        fan-out or stack axis.
      stack_axes: axes along which independent weights are stacked (scanned layers).
      groups: feature groups of a grouped convolution (``feature_group_count``).
      owner: for a bias, the path of the weight it moves with (a ``"/"``-joined string or a tuple of
        keys); ``None`` means the ``kernel`` (or ``embedding``) of the same module.

    Example:
      >>> import agd_optax
      >>> role = agd_optax.dense(in_axes=1, out_axes=0)  # A PyTorch-layout (out, in) matrix.
      >>> role.kind, role.in_axes, role.out_axes
      ('dense', (1,), (0,))
    """

    kind: str
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    spatial_axes: tuple[int, ...] | None = ()
    stack_axes: tuple[int, ...] = ()
    groups: int = 1
    owner: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise RoleError(f"unknown role kind {self.kind!r}; expected one of {_KINDS}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise RoleError(f"groups must be a positive int, got {self.groups!r}")


def _axes(axes: int | Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(axes, int | np.integer):
        return (int(axes),)
    try:
        return tuple(int(a) for a in axes)
    except TypeError as e:
        raise RoleError(f"{what} must be an int or a sequence of ints, got {axes!r}") from e


def dense(
    in_axes: int | Sequence[int] = -2,
    out_axes: int | Sequence[int] = -1,
    *,
    stack_axes: int | Sequence[int] = (),
) -> Role:
    """Role of a dense weight: the matrix from the flattened ``in_axes`` to the flattened ``out_axes``.

    The defaults fit a Flax ``Dense``/``Linear`` kernel ``(d_in, d_out)``. For PyTorch-layout
    ``(d_out, d_in)`` matrices use ``dense(in_axes=1, out_axes=0)``; for a query projection
    ``(d_model, heads, head_dim)`` use ``dense(in_axes=0, out_axes=(1, 2))``.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"w": jnp.zeros((64, 16))}  # (out, in)
      >>> [lay] = agd_optax.resolve_layouts(params, {"w": agd_optax.dense(in_axes=1, out_axes=0)})
      >>> round(lay.scale, 4)  # sqrt(d_out / d_in) = sqrt(64 / 16)
      2.0
    """
    return Role(
        "dense",
        in_axes=_axes(in_axes, "in_axes"),
        out_axes=_axes(out_axes, "out_axes"),
        stack_axes=_axes(stack_axes, "stack_axes"),
    )


def conv(
    spatial_axes: int | Sequence[int] | None = None,
    in_axis: int = -2,
    out_axis: int = -1,
    *,
    groups: int = 1,
    stack_axes: int | Sequence[int] = (),
) -> Role:
    """Role of a convolution kernel, by default Flax's ``(*spatial, in // groups, out)`` layout.

    ``groups`` is the convolution's ``feature_group_count`` (``groups == in == out`` is depthwise).
    A grouped kernel is treated as ``groups`` independent convolutions of
    ``in // groups -> out // groups`` channels, so ``s = sqrt(out / (groups * in_slice)) /
    sqrt(prod(spatial))`` where ``in_slice`` is the size of the stored fan-in axis.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"k": jnp.zeros((3, 3, 1, 32))}  # A depthwise 3x3 convolution of 32 channels.
      >>> [lay] = agd_optax.resolve_layouts(params, {"k": agd_optax.conv(groups=32)})
      >>> round(lay.scale, 4)  # sqrt(1 / 1) / sqrt(9)
      0.3333
    """
    return Role(
        "conv",
        in_axes=_axes(in_axis, "in_axis"),
        out_axes=_axes(out_axis, "out_axis"),
        spatial_axes=None if spatial_axes is None else _axes(spatial_axes, "spatial_axes"),
        stack_axes=_axes(stack_axes, "stack_axes"),
        groups=groups,
    )


def embedding(*, stack_axes: int | Sequence[int] = ()) -> Role:
    """Role of an embedding table ``(num_embeddings, features)``.

    AGD reads it as the matrix ``features -> num_embeddings``: fan-in ``features``, fan-out
    ``num_embeddings``, so ``s = sqrt(num_embeddings / features)``. That is the map the table
    applies when it is also the output head (``x @ table.T``), so a tied table's two uses agree,
    and it starts each row, the vector one id looks up, at a norm of about 1 (exactly 1 on
    average when ``num_embeddings >= features``). Reading the lookup as ``one_hot(ids) @ table``
    instead (fan-in ``num_embeddings``) starts the rows at ``sqrt(features / num_embeddings)``
    and keeps their steps as small; on two byte-level transformers it trained markedly worse
    (``benchmarks/README.md``, "AGD's rules"). For that reading give
    ``dense(in_axes=-2, out_axes=-1)``.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> [lay] = agd_optax.resolve_layouts({"t": jnp.zeros((100, 25))}, {"t": agd_optax.embedding()})
      >>> round(lay.scale, 4)  # features -> num_embeddings: sqrt(100 / 25)
      2.0
    """
    return Role(
        "embedding", in_axes=(-1,), out_axes=(-2,), stack_axes=_axes(stack_axes, "stack_axes")
    )


def bias(owner: str | Sequence[str] | None = None) -> Role:
    """Role of a bias that moves with its module's weight (``owner``, by default the sibling
    ``kernel`` or ``embedding`` leaf). Any shape: attention biases are ``(heads, head_dim)``.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"weight": jnp.zeros((8, 4)), "b": jnp.zeros(8)}  # PyTorch layout, odd bias name.
      >>> roles = {"weight": agd_optax.dense(1, 0), "b": agd_optax.bias(owner="weight")}
      >>> [lay.kind for lay in agd_optax.resolve_layouts(params, roles)]
      ['bias', 'weight']
    """
    if isinstance(owner, str):
        owner = tuple(k for k in owner.split("/") if k)
    elif owner is not None:
        owner = tuple(str(k) for k in owner)
    return Role("bias", spatial_axes=None, owner=owner)


def norm(*, stack_axes: int | Sequence[int] = ()) -> Role:
    """Role of the scale or the offset of a normalisation layer (LayerNorm, BatchNorm, RMSNorm...).

    ``stack_axes``: axes along which the parameters of stacked layers are stacked (``nn.scan``,
    ``nnx.vmap``); each slice is normalised on its own, as the unstacked layers would be.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"ln": {"scale": jnp.ones((4, 32))}, "w": jnp.zeros((4, 32, 32))}
      >>> roles = {"ln": {"scale": agd_optax.norm(stack_axes=0)}, "w": agd_optax.dense(stack_axes=0)}
      >>> lay = agd_optax.resolve_layouts(params, roles)[0]  # 4 stacked LayerNorm scales.
      >>> lay.kind, lay.stack_axes, lay.reduce_axes  # Normalised per layer.
      ('norm', (0,), (1,))
    """
    return Role("norm", spatial_axes=None, stack_axes=_axes(stack_axes, "stack_axes"))


_SHORTHANDS: dict[str, Callable[[], Role]] = {
    "dense": dense,
    "conv": conv,
    "embedding": embedding,
    "bias": bias,
    "norm": norm,
}


def as_role(value: Any, path: str) -> Role | None:
    """Turns a role, a shorthand string or ``"infer"`` (returned as ``None``) into a :class:`Role`."""
    if isinstance(value, Role):
        return value
    if isinstance(value, str):
        if value == "infer":
            return None
        if value in _SHORTHANDS:
            return _SHORTHANDS[value]()
    raise RoleError(
        f"the role given for leaf '{path}' is {value!r}; expected an agd_optax role "
        f"(dense(), conv(), embedding(), bias(), norm()) or one of the strings "
        f"{sorted(_SHORTHANDS) + ['infer']}"
    )
