"""trace_roles: the AGD role of every leaf, read from the computation that uses it.

``fn(params, *args)`` is traced with abstract values (``jax.make_jaxpr``; nothing runs) and each
parameter is followed through the jaxpr, through transposes, reshapes, casts, slices and
broadcasts, to the operation that gives it its role:

* ``dot_general``: a dense weight; the parameter's contracted axes are its fan-in, its free axes
  its fan-out, its batch axes stack axes (``vmap``, ``LinearGeneral`` batch axes).
* ``conv_general_dilated``: a convolution; spatial, input and output axes from the dimension
  numbers, groups from ``feature_group_count``.
* ``gather`` with many indices into a table: an embedding lookup (the indexed axis is the fan-out,
  as in :func:`agd_optax.embedding`); so is a ``dot_general`` that contracts the table with a
  one-hot of integer ids (``jax.nn.one_hot(ids, n) @ table``, ``arange(n) == ids[..., None]``).
* an axis taken away one slice at a time (``lax.scan`` over the parameter, ``W[i]``,
  ``W[0]``): a stack axis; every slice is a separate weight.
* a parameter added to the output of a weight's operation, varying only along that weight's
  fan-out: the bias of that weight.
* a parameter multiplied with (or added to) activations normalised by ``1/sqrt`` of their
  statistics: the scale or offset of a normalisation layer.

``scan``, ``cond``, ``while`` and every call-like primitive (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``checkpoint``, ``shard_map``) are followed into their sub-jaxprs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agd_optax._jaxpr.interpreter import Interpreter
from agd_optax._jaxpr.values import EMPTY, Info, Use, View
from agd_optax._paths import path_to_keys, path_to_str
from agd_optax._roles import Role, RoleError, bias

__all__ = ["trace_roles"]


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct | np.generic)


def trace_roles(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> Any:
    """The AGD roles of every leaf of ``params``, read from the computation ``fn(params, *args)``.

    ``fn`` is traced with abstract values (nothing runs, no memory is used for the parameters) and
    each leaf's role is read from the operations it enters, whatever the tree's names or layout:
    the contracted axes of a ``dot_general`` are its fan-in and the free axes its fan-out (so a
    PyTorch-layout ``x @ W.T`` reads as exactly as a Flax kernel), a convolution's axes and
    groups come from its dimension numbers and ``feature_group_count``, a table indexed by many
    ids is an embedding, an axis scanned over or indexed one slice at a time (``nn.scan``,
    ``nnx.scan`` over ``nnx.vmap``-built layers, ``W[i]``) is a stack axis whose slices are
    separate weights, a parameter added to a weight's output along its fan-out is that weight's
    bias, and a parameter applied to normalised activations is a normalisation-layer parameter
    (stacked ones normalised per slice).

    An axis batched by ``vmap`` is a stack axis when the inputs are batched with it (each slice
    sees its own inputs, as in an ensemble); a ``vmap`` over weights alone, all slices applied to
    one shared input, computes one wider weight, and is read so (like a fused ``qkv`` kernel used
    in one einsum: one weight whose fan-out is all its free axes).

    A parameter used several times the same way (a shared weight) is one weight. A table used
    both as an embedding lookup and as the output head (tied embeddings, ``x @ table.T``) is one
    such weight: a lookup reads as :func:`agd_optax.embedding`, the map ``features ->
    num_embeddings``, which is the head's map, so it keeps the embedding's role and counts once in
    the depth L. Any other leaf used
    in two different ways, used in a way AGD cannot read (a parameter inside ``exp``, a product of
    two parameters, a learned positional table added to activations) or not used at all is a
    :class:`RoleError`; one error lists every such leaf and what it saw.

    Args:
      fn: the model's forward function, ``fn(params, *args, **kwargs)``: for Linen
        ``lambda p, stats, x: model.apply({"params": p, "batch_stats": stats}, x,
        mutable=["batch_stats"])``, for NNX ``lambda p, rest, x: nnx.merge(graphdef, p, rest)(x)``
        with ``graphdef, p, rest = nnx.split(model, nnx.Param, ...)``, or any JAX function.
        Pass the other variables as arguments (they are made abstract too) rather than closing
        over them; ``nnx.eval_shape`` / ``jax.eval_shape`` models work, nothing is initialised.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      *args: example inputs; only their shapes and dtypes are used. Non-array values
        (``train=False``) are passed as they are.
      **kwargs: example keyword inputs, read the same way.

    Returns:
      A pytree of :class:`agd_optax.Role` with the structure of ``params``, for
      ``agd(roles=...)`` or ``reinitialize(..., roles=...)``.

    Raises:
      RoleError: listing every leaf whose role the computation does not decide.

    Example:
      >>> import jax, jax.numpy as jnp, agd_optax
      >>> params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros(16)}  # PyTorch layout (out, in)
      >>> roles = agd_optax.trace_roles(lambda p, x: p["w"] @ x + p["b"], params, jnp.zeros(4))
      >>> roles["w"].in_axes, roles["w"].out_axes, roles["b"].owner
      ((1,), (0,), ('w',))
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise RoleError("trace_roles got an empty parameter tree")
    paths = [path_to_keys(p) for p, _ in flat]
    shapes = [tuple(int(d) for d in np.shape(x)) for _, x in flat]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)

    inputs, in_def = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(inputs) if _is_array(x)]

    def call(p, arrays):
        leaves = list(inputs)
        for i, x in zip(dynamic, arrays):
            leaves[i] = x
        a, k = jax.tree.unflatten(in_def, leaves)
        return [x for x in jax.tree.leaves(fn(p, *a, **k)) if hasattr(x, "shape")]

    arrays = [jax.ShapeDtypeStruct(np.shape(inputs[i]), inputs[i].dtype) for i in dynamic]
    closed = jax.make_jaxpr(call)(abstract, arrays)
    n = len(flat)
    tracer = Interpreter(shapes)
    infos = [Info(views=(View(i, tuple((a,) for a in range(len(shapes[i])))),)) for i in range(n)]
    tracer.run(closed.jaxpr, infos + [EMPTY] * (len(closed.jaxpr.invars) - n))

    names = [path_to_str(k) for k in paths]
    roles: list[Role | None] = []
    problems: list[str] = []
    for i in range(n):
        role, problem = _decide(tracer.uses[i], paths, len(shapes[i]))
        roles.append(role)
        if problem:
            problems.append(f"  '{names[i]}' with shape {shapes[i]}: {problem}")
    if problems:
        raise RoleError(
            f"trace_roles cannot decide the AGD role of {len(problems)} leaves:\n"
            + "\n".join(problems)
            + "\nGive these roles explicitly (edit the returned tree, or pass agd(roles=...) a "
            "tree or prefix tree of agd_optax.dense(), conv(), embedding(), bias() or norm())."
        )
    return jax.tree_util.tree_unflatten(treedef, roles)


def _decide(
    uses: list[Use], paths: list[tuple[str, ...]], ndim: int
) -> tuple[Role | None, str | None]:
    """One leaf's role from all its uses, or a problem saying why not."""
    names = [path_to_str(k) for k in paths]

    def text(u: Use) -> str:
        out = u.what
        for k, nm in enumerate(names):
            out = out.replace(f"weight #{k}", f"'{nm}'")
        return out

    if not uses:
        return None, "fn does not use it (give it a role, or leave it out of the tree AGD updates)"
    kinds = {u.kind for u in uses}
    if "other" in kinds:
        seen = list(dict.fromkeys(text(u) for u in uses if u.kind == "other"))
        return None, "used in a way AGD cannot read: " + "; ".join(seen[:3])
    if kinds == {"bias"}:
        owners = sorted({_owner_of(u) for u in uses})
        if len(owners) > 1:
            return None, "added to the outputs of several weights: " + ", ".join(
                f"'{names[o]}'" for o in owners
            )
        return bias(owner=paths[owners[0]]), None
    if kinds == {"norm"}:
        distinct_roles = list(dict.fromkeys(_role_of(u) for u in uses))
        if len(distinct_roles) == 1:
            return distinct_roles[0], None
        return None, "a normalisation parameter stacked in different ways: " + "; ".join(
            text(u) for u in uses[:3]
        )
    if kinds <= {"weight", "lookup"}:
        distinct_keys = list(dict.fromkeys(_key(_role_of(u), ndim) for u in uses))
        if len(distinct_keys) == 1:  # A tied table (lookup and head) keeps the lookup's role.
            tied = next((u for u in uses if u.kind == "lookup"), uses[0])
            return _role_of(tied), None
        firsts = [next(u for u in uses if _key(_role_of(u), ndim) == k) for k in distinct_keys[:3]]
        return None, "used in different ways: " + " and ".join(
            f"{_describe(_role_of(u))} ({text(u)})" for u in firsts
        )
    firsts = list({u.kind: u for u in uses}.values())
    return None, "used in different ways: " + " and ".join(
        f"as a {'weight' if u.kind == 'lookup' else u.kind} ({text(u)})" for u in firsts
    )


def _role_of(use: Use) -> Role:
    """The role a weight, lookup or norm use carries (set by the rule that records the use)."""
    if use.role is None:
        raise AssertionError(f"a {use.kind} use without its role: {use.what}")
    return use.role


def _owner_of(use: Use) -> int:
    """The weight a bias use is added to (set by the rule that records the use)."""
    if use.owner is None:
        raise AssertionError(f"a bias use without its weight: {use.what}")
    return use.owner


def _key(role: Role, ndim: int) -> tuple[Any, ...]:
    """What makes two weight roles of one leaf the same: an embedding is the dense map
    ``features -> num_embeddings``, the same as a tied head's."""

    def axes(xs: tuple[int, ...] | None) -> frozenset[int]:
        return frozenset(a % ndim for a in xs or ())

    spatial = axes(role.spatial_axes) if role.kind == "conv" else frozenset()
    return axes(role.in_axes), axes(role.out_axes), axes(role.stack_axes), spatial, role.groups


def _describe(role: Role) -> str:
    out = f"{role.kind} with fan-in axes {role.in_axes}, fan-out axes {role.out_axes}"
    if role.stack_axes:
        out += f", stack axes {role.stack_axes}"
    return out
