"""Rules for the primitives that move, reshape, combine or loop over values: they carry each
value's parameter axes through, and record how parameters meet activations (a bias added, a
norm-layer scale multiplied, a parameter used any other way)."""

from __future__ import annotations

import dataclasses
from typing import Any

from agd_optax._jaxpr.values import EMPTY, Axes, Info, Use, View
from agd_optax._roles import norm


def _reshape_axes(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple[Axes, ...], leaf_shape
) -> tuple[list[Axes], set[int]]:
    """Maps per-axis leaf axes through a reshape; returns them and the leaf axes dropped."""
    new: list[Axes] = [()] * len(out_shape)
    dropped: set[int] = set()
    i = j = 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        if i < n and in_shape[i] == 1:
            dropped.update(axes[i])
            i += 1
            continue
        if j < m and out_shape[j] == 1:
            j += 1
            continue
        if i >= n or j >= m:
            break
        i0, j0 = i, j
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi, i = pi * in_shape[i], i + 1
            else:
                pj, j = pj * out_shape[j], j + 1
        block = tuple(a for k in range(i0, i) for a in axes[k])
        outs = [k for k in range(j0, j) if out_shape[k] != 1]
        if len(outs) == 1:
            new[outs[0]] = block
        elif leaf_shape is not None and [leaf_shape[a] for a in block] == [
            out_shape[k] for k in outs
        ]:
            for k, a in zip(outs, block):
                new[k] = (a,)  # A merged axis split back into its parts.
        else:
            for k in outs:
                new[k] = block
    return new, dropped


def transpose(interp, eqn, ins, where):
    perm = eqn.params["permutation"]
    return [interp.map_axes(ins[0], lambda axes, _: ([axes[p] for p in perm], set()))]


def reshape(interp, eqn, ins, where):
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    return [interp.map_axes(ins[0], lambda axes, s: _reshape_axes(in_shape, out_shape, axes, s))]


def squeeze(interp, eqn, ins, where):
    dims = {d % len(eqn.invars[0].aval.shape) for d in eqn.params["dimensions"]}

    def fn(axes, _):
        kept = [a for d, a in enumerate(axes) if d not in dims]
        return kept, {x for d in dims for x in axes[d]}

    return [interp.map_axes(ins[0], fn)]


def broadcast_in_dim(interp, eqn, ins, where):
    shape = tuple(eqn.params["shape"])
    dims = eqn.params["broadcast_dimensions"]
    in_shape = tuple(eqn.invars[0].aval.shape)

    def fn(axes, _):
        new: list[Axes] = [()] * len(shape)
        dropped = set()
        for i, d in enumerate(dims):
            if in_shape[i] == shape[d]:
                new[d] = axes[i]
            else:
                dropped.update(axes[i])
        return new, dropped

    return [interp.map_axes(ins[0], fn)] + [EMPTY] * (len(eqn.outvars) - 1)


def concatenate(interp, eqn, ins, where):
    views = tuple(v for i in ins for v in i.views)
    return [Info(views=views, const=all(i.const for i in ins))]


# Index patterns ------------------------------------------------------------------------
def iota(interp, eqn, ins, where):
    ndim = len(eqn.params["shape"])
    return [Info(const=True, iota=tuple(d == eqn.params["dimension"] for d in range(ndim)))]


def eq(interp, eqn, ins, where):
    """``ids == iota`` along an axis where the ids do not vary: a one-hot indicator."""
    if any(i.views for i in ins):
        interp.other(ins, f"'eq'{where}")
        return [EMPTY]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    for count, ids, var in ((ins[0], ins[1], eqn.invars[1]), (ins[1], ins[0], eqn.invars[0])):
        shape = tuple(getattr(var.aval, "shape", ()))
        if count.iota.count(True) != 1 or ids.const or len(count.iota) != len(out_shape):
            continue
        axis = count.iota.index(True)
        if len(shape) == len(out_shape) and shape[axis] == 1 < out_shape[axis]:
            return [Info(one_hot=count.iota)]
    return [Info(const=all(i.const for i in ins))]


# Elementwise ---------------------------------------------------------------------------
def binary(interp, eqn, ins, where) -> Info:
    name = eqn.primitive.name
    out_shape = tuple(eqn.outvars[0].aval.shape)
    ins = [broadcast_to(interp, info, v, out_shape) for info, v in zip(ins, eqn.invars)]
    a, b = ins
    if not a.views and not b.views:
        if name in ("mul", "div"):
            normalised = a.normalised or b.normalised
            outputs = a.outputs if b.const else b.outputs if a.const else ()
        else:
            normalised = (a.normalised and b.const) or (b.normalised and a.const)
            outputs = a.outputs if b.const else b.outputs if a.const else ()
        return Info(const=a.const and b.const, normalised=normalised, outputs=outputs)
    if a.views and b.views:
        interp.other(ins, f"'{name}' of two parameters{where}")
        return EMPTY
    param, act = (a, b) if a.views else (b, a)
    if act.normalised:
        for v in param.views:
            interp.uses[v.leaf].append(
                Use(
                    "norm",
                    f"'{name}' with normalised activations{where}",
                    norm(stack_axes=tuple(sorted(v.selected))),
                )
            )
        return Info(normalised=True)
    if act.const:
        if name == "div" and param is b:
            interp.other(ins, f"'div' by a parameter{where}")
            return EMPTY
        return dataclasses.replace(param, const=False)
    if name in ("add", "add_any", "sub") and len(act.outputs) == 1:
        owner, owner_axes = act.outputs[0]
        for v in param.views:
            fits = all(not pa or oa for pa, oa in zip(v.axes, owner_axes))
            if fits:
                interp.uses[v.leaf].append(
                    Use("bias", f"added to the output of weight #{owner}{where}", owner=owner)
                )
            else:
                interp.uses[v.leaf].append(
                    Use(
                        "other",
                        f"added to the output of weight #{owner}{where}, but varying along "
                        "axes that are not that weight's fan-out",
                    )
                )
        return EMPTY
    interp.other(ins, f"'{name}' with activations{where}")
    return EMPTY


def broadcast_to(interp, info: Info, var: Any, out_shape: tuple[int, ...]) -> Info:
    shape = tuple(getattr(var.aval, "shape", ()))
    if shape == out_shape or (not info.views and not info.outputs):
        return info
    lead = len(out_shape) - len(shape)

    def fn(axes, _):
        new: list[Axes] = [()] * len(out_shape)
        dropped = set()
        for i, ax in enumerate(axes):
            if shape[i] == out_shape[lead + i]:
                new[lead + i] = ax
            else:
                dropped.update(ax)
        return new, dropped

    return interp.map_axes(info, fn)


# Control flow --------------------------------------------------------------------------
def scan(interp, eqn, ins, where):
    p = eqn.params
    n_fixed = p["num_consts"] + p["num_carry"]
    body_ins = ins[:n_fixed] + [slice_leading(i) for i in ins[n_fixed:]]
    interp.run(p["jaxpr"].jaxpr, body_ins)
    return [EMPTY] * len(eqn.outvars)


def slice_leading(info: Info) -> Info:
    views = tuple(View(v.leaf, v.axes[1:], v.selected | frozenset(v.axes[0])) for v in info.views)
    outputs = tuple((w, axes[1:]) for w, axes in info.outputs)
    return dataclasses.replace(
        info, views=views, outputs=outputs, iota=info.iota[1:], one_hot=info.one_hot[1:]
    )


def cond(interp, eqn, ins, where):
    results = [interp.run(br.jaxpr, ins[1:]) for br in eqn.params["branches"]]
    return [r[0] if all(x == r[0] for x in r) else EMPTY for r in zip(*results)]


def while_loop(interp, eqn, ins, where):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[nc + nb :]
    interp.run(p["body_jaxpr"].jaxpr, ins[nc : nc + nb] + carry)
    interp.run(p["cond_jaxpr"].jaxpr, ins[:nc] + carry)
    return [EMPTY] * len(eqn.outvars)
