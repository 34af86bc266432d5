"""Roles inferred from Flax's parameter names and shapes, only where those decide them.

Flax names a Dense or Conv weight ``kernel``, an Embed table ``embedding``, a bias ``bias`` and a
normalisation scale ``scale``; Linen names unnamed submodules after their class (``Dense_0``,
``Conv_1``, ``LayerNorm_0``, ``ConvLocal_0``). From these alone:

* a 2-axis ``kernel`` is a Dense kernel ``(in, out)``, unless its bias says ``(out, in)`` (Flax's
  layout decides a bias-free one: a PyTorch-layout ``(out, in)`` kernel without a bias is read
  transposed; such trees need ``pytorch_roles`` or ``trace_roles``);
* a ``kernel`` under ``query``/``key``/``value`` is ``(in, heads, head_dim)``, and under an
  ``out`` module beside ``query``, ``key`` and ``value`` modules ``(heads, head_dim, out)``, any
  leading axes being stacked layers (``nn.scan``);
* a ``kernel`` of a ``Dense_N`` or ``ConvLocal_N`` module is a dense weight, its leading axes
  stacked layers (``ConvLocal``: one weight per output position, as it computes);
* a ``bias`` beside a kernel tells how many leading axes are stacked layers (its shape is
  ``(*stack, out)``); what is left beyond ``(in, out)`` is a convolution's kernel window only
  under a module named as a convolution (``conv`` its last word: ``Conv_0``, ``conv``,
  ``conv1``, ``conv2d``, ``convs``, ``stem_conv``; a list's entries, ``convs/0``, by the list's
  name), and a 4-axis kernel there is a 2-D Conv kernel ``(kh, kw, in, out)``;
* an ``embedding`` is a table ``(num_embeddings, features)``;
* a ``bias`` beside a ``kernel`` or ``embedding`` moves with it; a 1-axis ``bias`` beside a
  ``scale``, or in a ``LayerNorm_N``/``BatchNorm_N``/... module, and a 1-axis ``scale``, are
  norm-layer parameters.

Everything else is undecidable from names: a kernel with more than 2 axes under a module whose name
says neither convolution nor attention (``proj``, an ``out`` without ``query``/``key``/``value``
beside it, a ``ConvLocal`` named ``conv_init``), a 3-axis kernel (1-D conv, DenseGeneral or stacked
Dense), a conv kernel with one input channel (Flax stores depthwise convolutions that way), a
5-axis kernel without a bias, a kernel under an attention-named module that is not
``query``/``key``/``value``/``out`` (a fused ``qkv`` projection), a scale with several axes (a
stacked norm), a bias with no weight beside it. Those raise one :class:`RoleError` that lists
every such leaf with what would fix it, the ``trace_roles`` one-liner first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from agd_optax._paths import leaf_shape, path_to_keys, path_to_str
from agd_optax._roles import Role, RoleError, bias, conv, dense, embedding, norm

__all__ = ["infer_role", "infer_roles", "raise_undecided"]

_ATTENTION_IN = ("query", "key", "value")
_ATTENTION_OUT = ("out",)
_NORM_CLASSES = ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm", "InstanceNorm")
_LINEN_AUTONAME = re.compile(r"^([A-Za-z]+)_\d+$")
# A module named as a convolution: "conv" is its last word, after any trailing number (conv,
# Conv_0, conv1, conv_2, conv2d, Conv3D_1, convs, stem_conv, shortcut_conv, stemConv). Not
# conv_init, conv_in, deconv, ConvLocal_0 or ConvTranspose_0: their last word says otherwise.
_TRAILING_NUMBER = re.compile(r"([_-]?\d+)+$")
_CONV_WORD = re.compile(r"(^|[_-])conv(olution)?([123]d)?s?$|[a-z]Conv([123][dD])?s?$")


def _is_conv_name(name: str) -> bool:
    stem = _TRAILING_NUMBER.sub("", name)
    return bool(_CONV_WORD.search(stem) or _CONV_WORD.search(stem.lower()))


_TRACE_ONE_LINER = "tx = agd_optax.agd(roles=agd_optax.trace_roles(forward_fn, params, *inputs))"
_FIX = (
    "Other readers: agd_optax.nnx_roles(model) for an NNX model, agd_optax.pytorch_roles for a "
    "PyTorch-layout tree; or give the roles explicitly: agd(roles=...) takes a pytree, a prefix "
    "pytree or a callable of agd_optax.dense(), conv(), embedding(), bias(), norm()."
)


class _Undecided(RoleError):
    """One leaf that names cannot decide: ``why`` and ``fix``."""

    def __init__(self, path: str, shape: tuple[int, ...], why: str, fix: str):
        self.path, self.shape, self.why, self.fix = path, shape, why, fix
        super().__init__(f"cannot infer the AGD role of leaf '{path}' with shape {shape}: {why}")


def raise_undecided(errors: Sequence[_Undecided]) -> None:
    """Raises one RoleError listing every undecidable leaf, with what would fix each: first the
    ``trace_roles`` one-liner, which reads every leaf off the computation."""
    if not errors:
        return
    lines = [f"  '{e.path}' {e.shape}: {e.why}; fix: {e.fix}" for e in errors]
    leaves = "1 leaf" if len(errors) == 1 else f"{len(errors)} leaves"
    raise RoleError(
        f"cannot infer the AGD role of {leaves} from the parameter names. Read every role "
        f"off the model (any model, any layout):\n  {_TRACE_ONE_LINER}\nor fix each leaf:\n"
        + "\n".join(lines)
        + f"\n{_FIX}"
    )


def _linen_class(parent: str) -> str | None:
    match = _LINEN_AUTONAME.match(parent)
    return match.group(1) if match else None


def _stack_from_bias(shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> int | None:
    """How many leading axes of a kernel are stacked layers, from its bias ``(*stack, out)``."""
    if bias_shape is None or not bias_shape or bias_shape[-1] != shape[-1]:
        return None
    k = len(bias_shape) - 1
    return k if bias_shape[:k] == shape[:k] and k <= len(shape) - 2 else None


def infer_role(
    keys: tuple[str, ...], shape: tuple[int, ...], siblings: dict[str, tuple[int, ...]]
) -> Role:
    """The role of a leaf from its path and shape, following Flax's naming conventions.

    Args:
      keys: the leaf's path as strings, e.g. ``("layers", "0", "kernel")``.
      shape: the leaf's shape.
      siblings: the other leaves of the same module, name to shape (as :func:`siblings_of`
        gives it, with the names of the modules beside this one in ``siblings.modules``).

    Raises:
      RoleError: naming the path and what would fix it, when the names do not decide the role.
    """
    path = path_to_str(keys)
    name = keys[-1] if keys else ""
    parent = keys[-2] if len(keys) >= 2 else ""
    cls = _linen_class(parent)
    ndim = len(shape)

    def fail(why: str, fix: str = "trace_roles, nnx_roles or an explicit role") -> _Undecided:
        return _Undecided(path, shape, why, fix)

    if name == "kernel":
        beside: frozenset[str] = getattr(siblings, "modules", frozenset())
        return _kernel(keys, shape, siblings.get("bias"), cls, beside, fail)
    if name == "embedding":
        if ndim == 2:
            return embedding()
        if cls == "Embed" and ndim > 2:
            return embedding(stack_axes=tuple(range(ndim - 2)))
        raise fail(
            f"an embedding table has 2 axes (num_embeddings, features), this one {ndim}",
            "embedding(stack_axes=...) for stacked tables",
        )
    if name == "bias":
        if "kernel" in siblings or "embedding" in siblings:
            return bias()
        if ndim == 1 and ("scale" in siblings or cls in _NORM_CLASSES):
            return norm()
        if "weight" in siblings:
            raise fail(
                "a bias beside a 'weight' (PyTorch names)",
                "agd(roles=agd_optax.pytorch_roles) for a PyTorch-layout tree",
            )
        if ndim > 1 and ("scale" in siblings or cls in _NORM_CLASSES):
            raise fail(
                "a norm-layer offset with several axes: stacked layers or several feature axes",
                "norm(stack_axes=...) for stacked layers, norm() otherwise, or trace_roles",
            )
        raise fail(
            "a bias with no 'kernel' or 'embedding' beside it: its weight is named otherwise or "
            "is not in the tree",
            "bias(owner='path/to/weight'), norm() for a norm layer without scale, or trace_roles",
        )
    if name == "scale":
        if "kernel" in siblings:
            raise fail("a 'scale' beside a 'kernel' is not a normalisation layer's")
        if ndim == 1:
            return norm()
        raise fail(
            "a norm-layer scale with several axes: stacked layers or several feature axes",
            "norm(stack_axes=...) for stacked layers, norm() otherwise, or trace_roles",
        )
    if name == "weight":
        raise fail(
            "'weight' is not a Flax parameter name (it is PyTorch's, whose layout differs)",
            "agd(roles=agd_optax.pytorch_roles) for a PyTorch-layout tree",
        )
    if not name or name.isdigit():
        raise fail(
            "a leaf without a name (a bare array, or an entry of a tuple or list): names cannot "
            "tell what it is"
        )
    raise fail(
        f"{name!r} is not a Flax parameter name AGD knows ('kernel', 'embedding', 'bias', 'scale')"
    )


def _attention_kernel(parent: str, ndim: int, beside: frozenset[str]) -> Role | None:
    """A projection of Flax's attention: under query/key/value, or under an ``out`` that has
    all three beside it; leading axes are stacked layers."""
    if ndim < 3:
        return None
    n = ndim - 3
    stack = tuple(range(n))
    if parent in _ATTENTION_IN:
        return dense(n, (n + 1, n + 2), stack_axes=stack)
    if parent in _ATTENTION_OUT and set(_ATTENTION_IN) <= beside:
        return dense((n, n + 1), n + 2, stack_axes=stack)
    return None


def _not_a_conv_name(parent: str, ndim: int, beside: frozenset[str]) -> str:
    """Why a kernel with axes beyond (in, out) is not read as a convolution under ``parent``."""
    what = (
        "a convolution, a ConvLocal (one dense map per output position), a multi-axis dense "
        "kernel or stacked layers"
    )
    if parent in _ATTENTION_OUT:
        missing = sorted(set(_ATTENTION_IN) - beside)
        return (
            f"a {ndim}-axis kernel under 'out': that name makes an attention output projection "
            f"only beside 'query', 'key' and 'value' modules (here {missing} are missing), and it "
            f"does not name a convolution; it may be {what}"
        )
    where = (
        f"under '{parent}', a module name that says" if parent else "with no module name: it says"
    )
    return (
        f"a {ndim}-axis kernel {where} neither convolution (conv, Conv_0, conv1, ...) nor "
        f"attention; it may be {what}"
    )


def _kernel(keys, shape, bias_shape, cls, beside, fail) -> Role:
    ndim = len(shape)
    parent = keys[-2] if len(keys) >= 2 else ""
    if ndim < 2:
        raise fail(f"a kernel with {ndim} axes matches no Flax layer")
    role = _attention_kernel(parent, ndim, beside)
    if role is not None:
        return role
    if cls in ("Dense", "ConvLocal"):
        return dense(ndim - 2, ndim - 1, stack_axes=tuple(range(ndim - 2)))
    if cls in ("DenseGeneral", "Einsum", "ConvTranspose"):
        raise fail(f"a {cls} kernel: its fan-in and fan-out axes are the module's settings")
    if any(re.search("attn|attention|qkv|kv", k, re.I) for k in keys[:-1]) and ndim >= 3:
        raise fail(
            _not_a_conv_name(parent, ndim, beside)
            if parent in _ATTENTION_OUT
            else "a kernel with several axes under an attention module, not named query, key, "
            "value or out: a fused projection or a stack, not a convolution",
            "trace_roles, or dense(in_axes=..., out_axes=..., stack_axes=...)",
        )
    if ndim == 2:
        if bias_shape is None or bias_shape == (shape[1],):
            return dense()
        if bias_shape == (shape[0],):
            return dense(1, 0)  # The bias fixes the fan-out axis: PyTorch's (out, in) layout.
        raise fail(f"its bias has shape {bias_shape}, which fits neither (in, out) nor (out, in)")
    stack = _stack_from_bias(shape, bias_shape)
    if bias_shape is not None and stack is None:
        raise fail(
            f"its bias {bias_shape} does not fit a Flax kernel (*stack, ..., in, out); a "
            "PyTorch-layout or grouped kernel?"
        )
    if stack is not None and ndim - 2 - stack == 0:
        return dense(ndim - 2, ndim - 1, stack_axes=tuple(range(stack)))
    # A list's entries (convs/0/kernel) are named by the list.
    named = next((k for k in reversed(keys[:-1]) if not k.isdigit()), "")
    if not (_is_conv_name(named) or cls == "Conv"):
        raise fail(
            _not_a_conv_name(named, ndim, beside),
            "trace_roles, nnx_roles, or conv() / dense(in_axes=..., out_axes=..., "
            "stack_axes=...) by hand",
        )
    if not stack:
        if ndim == 3 and cls != "Conv":
            raise fail(
                "a 3-axis kernel may be a 1-D convolution (width, in, out), a multi-axis dense "
                "kernel or a stack of dense kernels (scanned layers)",
                "trace_roles, nnx_roles, conv() or dense(stack_axes=0)",
            )
        if ndim > 4 and stack is None:
            raise fail(
                f"a {ndim}-axis kernel may be a {ndim - 2}-D convolution or a stack of "
                f"{ndim - 3}-D convolutions (scanned layers)",
                "trace_roles, nnx_roles or conv(stack_axes=...)",
            )
        stack = 0
    if shape[-2] == 1 and shape[-1] > 1:
        raise fail(
            "a convolution kernel with one input channel per group: a depthwise convolution "
            "(feature_group_count = channels) or a convolution of a one-channel input",
            "trace_roles, nnx_roles, conv(groups=channels) or conv()",
        )
    return conv(stack_axes=tuple(range(stack)))


class _Module(dict):
    """A module's leaves, name to shape; ``modules``: the names of the modules beside it."""

    modules: frozenset[str] = frozenset()


def siblings_of(all_keys: Sequence[tuple[str, ...]], shapes) -> dict:
    """Per module path, its leaves' names and shapes, and (``.modules``) the names of the other
    modules under the same parent (what tells an attention block's ``out`` from a layer's)."""
    out: dict[tuple[str, ...], _Module] = {}
    for keys, shape in zip(all_keys, shapes):
        out.setdefault(keys[:-1], _Module())[keys[-1] if keys else ""] = shape
    children: dict[tuple[str, ...], set[str]] = {}
    for module in out:
        for n in range(len(module)):
            children.setdefault(module[:n], set()).add(module[n])
    for module, leaves in out.items():
        if module:
            leaves.modules = frozenset(children[module[:-1]] - {module[-1]})
    return out


def infer_roles(params: Any) -> Any:
    """The pytree of roles that :func:`agd_optax.agd` infers for ``params`` from Flax's names
    (for inspection, or as a starting point to edit).

    Raises:
      RoleError: one error listing every leaf whose role the names do not decide.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"Dense_0": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
      >>> roles = agd_optax.infer_roles(params)
      >>> roles["Dense_0"]["kernel"].kind, roles["Dense_0"]["bias"].kind
      ('dense', 'bias')
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    all_keys = [path_to_keys(p) for p, _ in leaves]
    shapes = [leaf_shape(x) for _, x in leaves]
    sib = siblings_of(all_keys, shapes)
    roles, errors = [], []
    for keys, shape in zip(all_keys, shapes):
        try:
            roles.append(infer_role(keys, shape, sib[keys[:-1]]))
        except _Undecided as e:
            errors.append(e)
    raise_undecided(errors)
    return jax.tree_util.tree_unflatten(treedef, roles)
