"""The interpreter of the jaxpr reading: it runs a jaxpr on :class:`~agd_optax._jaxpr.values.Info`
values instead of arrays, each primitive by its rule in :data:`RULES` (rules that move values
without changing their axes, and elementwise arithmetic, have generic handlers), and collects
every parameter's uses for :func:`agd_optax.trace_roles` to decide its role."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.extend import core as jcore

from agd_optax._jaxpr import structure, weights
from agd_optax._jaxpr.values import BINARY, CONST, EMPTY, SAME, Info, Use, View, where

__all__ = ["RULES", "Interpreter"]

Rule = Callable[["Interpreter", Any, list[Info], str], list[Info]]

RULES: dict[str, Rule] = {
    # Weights.
    "dot_general": weights.dot_general,
    "conv_general_dilated": weights.conv_general_dilated,
    "gather": weights.gather,
    # Axes moved, merged or added.
    "transpose": structure.transpose,
    "reshape": structure.reshape,
    "squeeze": structure.squeeze,
    "broadcast_in_dim": structure.broadcast_in_dim,
    "concatenate": structure.concatenate,
    # Index patterns (one_hot's count and comparison).
    "iota": structure.iota,
    "eq": structure.eq,
    # Control flow.
    "scan": structure.scan,
    "cond": structure.cond,
    "while": structure.while_loop,
}


class Interpreter:
    """Runs jaxprs on :class:`Info` values over parameter leaves of ``shapes``; ``uses`` holds,
    per leaf, every :class:`Use` seen."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = shapes
        self.uses: list[list[Use]] = [[] for _ in shapes]

    def run(self, jaxpr: Any, in_infos: list[Info]) -> list[Info]:
        env: dict[Any, Info] = {}

        def read(v: Any) -> Info:
            if isinstance(v, jcore.Literal):
                return CONST
            return env.get(v, EMPTY)

        for v in jaxpr.constvars:
            env[v] = CONST
        for v, info in zip(jaxpr.invars, in_infos):
            env[v] = info
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for v, info in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = info
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Info]) -> list[Info]:
        """One equation: its rule, a generic handler, its inner jaxpr, or an opaque use."""
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        at = where(eqn)
        rule = RULES.get(name)
        if rule is not None:
            return rule(self, eqn, ins, at)
        if name in SAME:
            return [self.map_axes(ins[0], lambda axes, _: (list(axes), set()))] + [EMPTY] * (
                n_out - 1
            )
        if name in BINARY:
            return [structure.binary(self, eqn, ins, at)]
        subs = [p for p in eqn.params.values() if isinstance(p, jcore.ClosedJaxpr | jcore.Jaxpr)]
        if len(subs) == 1:
            sub = subs[0].jaxpr if isinstance(subs[0], jcore.ClosedJaxpr) else subs[0]
            if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
                return self.run(sub, ins)
        if any(i.views for i in ins):
            self.other(ins, f"'{name}'{at}")
        const = all(i.const for i in ins)
        normalised = name in ("rsqrt", "sqrt") or (
            name in ("broadcast_in_dim", "reshape", "transpose", "squeeze")
            and any(i.normalised for i in ins)
        )
        return [Info(const=const, normalised=normalised)] * n_out

    def other(self, infos: list[Info], what: str) -> None:
        """Records a use of every parameter in ``infos`` that gives it no role."""
        for info in infos:
            for v in info.views:
                self.uses[v.leaf].append(Use("other", what))

    def map_axes(self, info: Info, fn: Callable) -> Info:
        """Applies an axis map ``fn(axes, leaf_shape) -> (new axes, dropped)`` to an info."""
        views = []
        for v in info.views:
            axes, dropped = fn(v.axes, self.shapes[v.leaf])
            views.append(View(v.leaf, tuple(axes), v.selected | frozenset(dropped)))
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
