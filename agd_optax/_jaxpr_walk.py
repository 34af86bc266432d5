"""The jaxpr walk behind :func:`agd_optax.trace_roles`: follows every parameter leaf through a
jaxpr (shape operations, elementwise operations, control flow and calls) and records each
operation that gives it a role (see ``_trace.py`` for the rules)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.extend import core as jcore

from agd_optax._jaxpr_ops import (
    _BINARY,
    _CONST,
    _EMPTY,
    _SAME,
    Axes,
    _Info,
    _Use,
    _View,
    _WeightOps,
    _where,
)
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


class _Tracer(_WeightOps):
    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = shapes
        self.uses: list[list[_Use]] = [[] for _ in shapes]

    # ---------------------------------------------------------------------------------------
    def run(self, jaxpr: Any, in_infos: list[_Info]) -> list[_Info]:
        env: dict[Any, _Info] = {}

        def read(v: Any) -> _Info:
            if isinstance(v, jcore.Literal):
                return _CONST
            return env.get(v, _EMPTY)

        for v in jaxpr.constvars:
            env[v] = _CONST
        for v, info in zip(jaxpr.invars, in_infos):
            env[v] = info
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for v, info in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = info
        return [read(v) for v in jaxpr.outvars]

    # ---------------------------------------------------------------------------------------
    def eqn(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        where = _where(eqn)
        handler = getattr(self, f"_{name}", None)
        if handler is not None:
            return handler(eqn, ins, where)
        if name in _SAME:
            return [self._map(ins[0], lambda axes, _: (list(axes), set()))] + [_EMPTY] * (n_out - 1)
        if name in _BINARY:
            return [self._binary(eqn, ins, where)]
        subs = [p for p in eqn.params.values() if isinstance(p, jcore.ClosedJaxpr | jcore.Jaxpr)]
        if len(subs) == 1:
            sub = subs[0].jaxpr if isinstance(subs[0], jcore.ClosedJaxpr) else subs[0]
            if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
                return self.run(sub, ins)
        if any(i.views for i in ins):
            self.other(ins, f"'{name}'{where}")
        const = all(i.const for i in ins)
        normalised = name in ("rsqrt", "sqrt") or (
            name in ("broadcast_in_dim", "reshape", "transpose", "squeeze")
            and any(i.normalised for i in ins)
        )
        return [_Info(const=const, normalised=normalised)] * n_out

    def _map(self, info: _Info, fn: Callable) -> _Info:
        """Applies an axis map ``fn(axes, leaf_shape) -> (new axes, dropped)`` to an info."""
        views = []
        for v in info.views:
            axes, dropped = fn(v.axes, self.shapes[v.leaf])
            views.append(_View(v.leaf, tuple(axes), v.selected | frozenset(dropped)))
        outputs = tuple((w, tuple(fn(axes, self.shapes[w])[0])) for w, axes in info.outputs)

        def flags(marked: tuple[bool, ...]) -> tuple[bool, ...]:  # Where a marked axis goes.
            if not marked:
                return ()
            new, _ = fn([(-1,) if m else () for m in marked], None)
            return tuple(-1 in axes for axes in new)

        return dataclasses.replace(
            info,
            views=tuple(views),
            outputs=outputs,
            iota=flags(info.iota),
            one_hot=flags(info.one_hot),
        )

    # Shape primitives ----------------------------------------------------------------------
    def _transpose(self, eqn, ins, where):
        perm = eqn.params["permutation"]
        return [self._map(ins[0], lambda axes, _: ([axes[p] for p in perm], set()))]

    def _reshape(self, eqn, ins, where):
        in_shape = tuple(eqn.invars[0].aval.shape)
        out_shape = tuple(eqn.outvars[0].aval.shape)
        return [self._map(ins[0], lambda axes, s: _reshape_axes(in_shape, out_shape, axes, s))]

    def _squeeze(self, eqn, ins, where):
        dims = {d % len(eqn.invars[0].aval.shape) for d in eqn.params["dimensions"]}

        def fn(axes, _):
            kept = [a for d, a in enumerate(axes) if d not in dims]
            return kept, {x for d in dims for x in axes[d]}

        return [self._map(ins[0], fn)]

    def _broadcast_in_dim(self, eqn, ins, where):
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

        return [self._map(ins[0], fn)] + [_EMPTY] * (len(eqn.outvars) - 1)

    def _concatenate(self, eqn, ins, where):
        views = tuple(v for i in ins for v in i.views)
        return [_Info(views=views, const=all(i.const for i in ins))]

    # Index patterns ------------------------------------------------------------------------
    def _iota(self, eqn, ins, where):
        ndim = len(eqn.params["shape"])
        return [_Info(const=True, iota=tuple(d == eqn.params["dimension"] for d in range(ndim)))]

    def _eq(self, eqn, ins, where):
        """``ids == iota`` along an axis where the ids do not vary: a one-hot indicator."""
        if any(i.views for i in ins):
            self.other(ins, f"'eq'{where}")
            return [_EMPTY]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        for count, ids, var in ((ins[0], ins[1], eqn.invars[1]), (ins[1], ins[0], eqn.invars[0])):
            shape = tuple(getattr(var.aval, "shape", ()))
            if count.iota.count(True) != 1 or ids.const or len(count.iota) != len(out_shape):
                continue
            axis = count.iota.index(True)
            if len(shape) == len(out_shape) and shape[axis] == 1 < out_shape[axis]:
                return [_Info(one_hot=count.iota)]
        return [_Info(const=all(i.const for i in ins))]

    # Elementwise ---------------------------------------------------------------------------
    def _binary(self, eqn, ins, where) -> _Info:
        name = eqn.primitive.name
        out_shape = tuple(eqn.outvars[0].aval.shape)
        ins = [self._broadcast_to(info, v, out_shape) for info, v in zip(ins, eqn.invars)]
        a, b = ins
        if not a.views and not b.views:
            if name in ("mul", "div"):
                normalised = a.normalised or b.normalised
                outputs = a.outputs if b.const else b.outputs if a.const else ()
            else:
                normalised = (a.normalised and b.const) or (b.normalised and a.const)
                outputs = a.outputs if b.const else b.outputs if a.const else ()
            return _Info(const=a.const and b.const, normalised=normalised, outputs=outputs)
        if a.views and b.views:
            self.other(ins, f"'{name}' of two parameters{where}")
            return _EMPTY
        param, act = (a, b) if a.views else (b, a)
        if act.normalised:
            for v in param.views:
                self.uses[v.leaf].append(
                    _Use(
                        "norm",
                        f"'{name}' with normalised activations{where}",
                        norm(stack_axes=tuple(sorted(v.selected))),
                    )
                )
            return _Info(normalised=True)
        if act.const:
            if name == "div" and param is b:
                self.other(ins, f"'div' by a parameter{where}")
                return _EMPTY
            return dataclasses.replace(param, const=False)
        if name in ("add", "add_any", "sub") and len(act.outputs) == 1:
            owner, owner_axes = act.outputs[0]
            for v in param.views:
                fits = all(not pa or oa for pa, oa in zip(v.axes, owner_axes))
                if fits:
                    self.uses[v.leaf].append(
                        _Use("bias", f"added to the output of weight #{owner}{where}", owner=owner)
                    )
                else:
                    self.uses[v.leaf].append(
                        _Use(
                            "other",
                            f"added to the output of weight #{owner}{where}, but varying along "
                            "axes that are not that weight's fan-out",
                        )
                    )
            return _EMPTY
        self.other(ins, f"'{name}' with activations{where}")
        return _EMPTY

    def _broadcast_to(self, info: _Info, var: Any, out_shape: tuple[int, ...]) -> _Info:
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

        return self._map(info, fn)

    # Control flow --------------------------------------------------------------------------
    def _scan(self, eqn, ins, where):
        p = eqn.params
        n_fixed = p["num_consts"] + p["num_carry"]
        body_ins = ins[:n_fixed] + [self._slice_leading(i) for i in ins[n_fixed:]]
        self.run(p["jaxpr"].jaxpr, body_ins)
        return [_EMPTY] * len(eqn.outvars)

    def _slice_leading(self, info: _Info) -> _Info:
        views = tuple(
            _View(v.leaf, v.axes[1:], v.selected | frozenset(v.axes[0])) for v in info.views
        )
        outputs = tuple((w, axes[1:]) for w, axes in info.outputs)
        return dataclasses.replace(
            info, views=views, outputs=outputs, iota=info.iota[1:], one_hot=info.one_hot[1:]
        )

    def _cond(self, eqn, ins, where):
        results = [self.run(br.jaxpr, ins[1:]) for br in eqn.params["branches"]]
        return [r[0] if all(x == r[0] for x in r) else _EMPTY for r in zip(*results)]

    def _while(self, eqn, ins, where):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = ins[nc + nb :]
        self.run(p["body_jaxpr"].jaxpr, ins[nc : nc + nb] + carry)
        self.run(p["cond_jaxpr"].jaxpr, ins[:nc] + carry)
        return [_EMPTY] * len(eqn.outvars)
