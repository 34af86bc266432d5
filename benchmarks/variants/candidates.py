"""Every candidate of the calibration, as an optax transformation built from a model's roles.

Each reuses AGD's own step kernel (``agd_optax._step.agd_step``: per-layer normalisation, ``s(W)``,
depth, ``G`` and ``eta``) and changes one thing. Only the chosen one ships in the library
(``agd_optax.agd_momentum``, the candidate ``mom_ema_etag``); the others stay here, so that every
row of the calibration table can be re-run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import agd_optax
from agd_optax._layouts import resolve_layouts
from agd_optax._step import agd_step, plan_of
from benchmarks.variants import round_two


def _agd_updates(leaves: list[jax.Array], layouts: list[Any]) -> tuple[list, jax.Array, jax.Array]:
    """AGD's step of flat leaves, norms in float32: (updates without gain, eta, G)."""
    acc = jnp.dtype(jnp.float32)
    return agd_step(leaves, plan_of(leaves, layouts, acc), acc)


class MomentumState(NamedTuple):
    count: jax.Array  # shape=(), int32.
    m: Any  # Like the parameters: the running average.


def momentum_variant(
    roles: Any, beta: float, nesterov: bool = False, eta_from: str = "average", inputs: str = "grad"
) -> optax.GradientTransformation:
    """``m = beta m + (1 - beta) x``; AGD's direction from ``m`` (or Nesterov's
    ``beta m + (1 - beta) x``), its step ``eta`` from ``m``'s norms (``eta_from="average"``) or
    the gradient's (``"grad"``). ``x`` is the gradient (``inputs="grad"``), AGD's update
    (``"update"``), or the per-layer unit-normalised gradient (``"unit"``)."""

    def init(params):
        return MomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        layouts = resolve_layouts(grads, roles)
        leaves, treedef = jax.tree.flatten(grads)
        if inputs == "grad":
            x = leaves
        else:
            steps, eta, _ = _agd_updates(leaves, layouts)
            depth = sum(lay.count for lay in layouts)
            unit = jnp.where(eta > 0, depth / jnp.where(eta > 0, eta, 1.0), 0.0)
            factor = 1.0 if inputs == "update" else unit
            x = [u * factor / lay.scale for u, lay in zip(steps, layouts)]
        m = [beta * a + (1 - beta) * b for a, b in zip(treedef.flatten_up_to(state.m), x)]
        d = [beta * a + (1 - beta) * b for a, b in zip(m, x)] if nesterov else m
        direction, eta_d, _ = _agd_updates(d, layouts)
        if eta_from == "grad":
            _, eta_g, _ = _agd_updates(leaves, layouts)
            ratio = jnp.where(eta_d > 0, eta_g / jnp.where(eta_d > 0, eta_d, 1.0), 0.0)
            direction = [u * ratio for u in direction]
        updates = jax.tree.unflatten(treedef, [-u for u in direction])
        return updates, MomentumState(state.count + 1, jax.tree.unflatten(treedef, m))

    return optax.GradientTransformation(init, update)


class ScheduleFreeState(NamedTuple):
    count: jax.Array  # shape=(), int32.
    z: Any  # Like the parameters: the base sequence.
    weight_sum: jax.Array  # shape=(), float32.


def schedule_free_variant(
    roles: Any, power: float, b1: float = 0.9
) -> optax.GradientTransformation:
    """Schedule-free averaging around AGD: AGD moves ``z``; the parameters are the interpolation
    ``(1 - b1) z + b1 x`` of ``z`` and the running average ``x`` of the ``z`` iterates, each
    weighted by ``eta ** power`` (0: uniform). Evaluate at ``x`` (:func:`schedule_free_eval`)."""

    def init(params):
        z = jax.tree.map(jnp.asarray, params)
        return ScheduleFreeState(jnp.zeros([], jnp.int32), z, jnp.zeros([], jnp.float32))

    def update(grads, state, params):
        layouts = resolve_layouts(grads, roles)
        leaves, treedef = jax.tree.flatten(grads)
        steps, eta, _ = _agd_updates(leaves, layouts)
        z = jax.tree.map(lambda z, u: z - u, state.z, jax.tree.unflatten(treedef, steps))
        weight = eta**power
        total = state.weight_sum + weight
        c = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)

        def step(y, z_old, z_new):
            x = (y - (1 - b1) * z_old) / b1
            return (1 - b1) * z_new + b1 * ((1 - c) * x + c * z_new) - y

        updates = jax.tree.map(step, params, state.z, z)
        return updates, ScheduleFreeState(state.count + 1, z, total)

    return optax.GradientTransformation(init, update)


def schedule_free_eval(state: Any, params: Any, b1: float = 0.9) -> Any:
    """The averaged point ``x`` at which a schedule-free variant is evaluated."""
    return jax.tree.map(lambda y, z: (y - (1 - b1) * z) / b1, params, state.z)


def on_sphere(roles: Any, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, then every weight rescaled to the Frobenius norm of AGD's initialisation,
    ``s(W) * sqrt(min(d_in, d_out))`` per kernel position and stack slice."""

    def update(grads, state, params):
        updates, state = inner.update(grads, state, params)
        layouts = resolve_layouts(grads, roles)
        p_leaves, treedef = jax.tree.flatten(params)
        out = []
        for p, u, lay in zip(p_leaves, jax.tree.leaves(updates), layouts):
            if lay.kind != "weight":
                out.append(u)
                continue
            d_in = math.prod(p.shape[a] for a in lay.in_axes)
            d_out = math.prod(p.shape[a] for a in lay.out_axes) // lay.groups
            target = lay.scale * math.sqrt(lay.groups * min(d_in, d_out))
            w = p + u
            norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=lay.reduce_axes, keepdims=True))
            out.append(w * (target / norm) - p)
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(inner.init, update)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One row of the calibration: a builder from roles, and how it is evaluated."""

    build: Callable[[Any], optax.GradientTransformation]
    description: str
    agd_init: bool = True  # AGD's orthogonal initialisation (else Flax's).
    eval_params: Callable[[Any, Any], Any] | None = None
    eligible: bool = True  # Diagnostics and references are not.


def _agd_then(roles: Any, tail: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(agd_optax.scale_by_agd(roles=roles), tail)


CANDIDATES: dict[str, Candidate] = {
    "agd": Candidate(lambda r: agd_optax.agd(roles=r), "the paper's algorithm"),
    "mom_ema": Candidate(lambda r: momentum_variant(r, 0.9), "EMA momentum 0.9, eta from m"),
    "mom_ema_etag": Candidate(lambda r: agd_optax.agd_momentum(roles=r),
                              "EMA momentum 0.9, eta from g: agd_optax.agd_momentum()"),
    "nest_ema": Candidate(lambda r: momentum_variant(r, 0.9, nesterov=True),
                          "Nesterov EMA, eta from its norms"),
    "nest_ema_etag": Candidate(lambda r: momentum_variant(r, 0.9, nesterov=True, eta_from="grad"),
                               "Nesterov EMA, eta from g"),
    "mom95_etag": Candidate(lambda r: momentum_variant(r, 0.95, eta_from="grad"),
                            "EMA momentum 0.95, eta from g"),
    "nmom_etag": Candidate(lambda r: momentum_variant(r, 0.9, eta_from="grad", inputs="update"),
                           "EMA of AGD's updates, renormalised, eta from g"),
    "nmom1_etag": Candidate(lambda r: momentum_variant(r, 0.9, eta_from="grad", inputs="unit"),
                            "EMA of unit-normalised gradients, eta from g"),
    "ema_upd": Candidate(lambda r: _agd_then(r, optax.chain(optax.ema(0.9), optax.scale(-1.0))),
                         "EMA (debiased) of AGD's updates, applied as is"),
    "sf_eta2": Candidate(lambda r: schedule_free_variant(r, 2.0),
                         "schedule-free around AGD, weights eta^2", eval_params=schedule_free_eval),
    "sf_unif": Candidate(lambda r: schedule_free_variant(r, 0.0),
                         "schedule-free around AGD, uniform weights",
                         eval_params=schedule_free_eval),
    "sphere": Candidate(lambda r: on_sphere(r, agd_optax.agd(roles=r)),
                        "AGD, weights kept at their initial norm"),
    "mom_etag_sphere": Candidate(lambda r: on_sphere(r, agd_optax.agd_momentum(roles=r)),
                                 "EMA momentum (eta from g), weights kept at initial norm"),
    # Round two (docs/agd_variants.md, "Round two").
    "ortho_frob": Candidate(round_two.ortho_frob,
                            "orthogonalised momentum at AGD's Frobenius budget, eta from g"),
    "ortho_nuclear": Candidate(round_two.ortho_nuclear,
                               "orthogonalised momentum at spectral norm 1, eta from nuclear norms"),
    "hyper_gain": Candidate(round_two.hyper_gain,
                            "agd_momentum, gain learned by hypergradient descent"),
    "adam_dir": Candidate(round_two.adam_dir, "AGD's per-layer step along Adam's direction"),
    "scion_auto": Candidate(round_two.scion_auto,
                            "Scion's per-layer geometry at agd_momentum's per-layer step"),
    "gain2": Candidate(lambda r: agd_optax.agd(2.0, roles=r), "diagnostic: gain 2", eligible=False),
    "gain3": Candidate(lambda r: agd_optax.agd(3.0, roles=r),
                       "diagnostic: gain 3 (= gain L here, L = 3)", eligible=False),
    "prodigy": Candidate(lambda r: optax.contrib.prodigy(1.0),
                         "reference: Prodigy, defaults (Flax init)", agd_init=False, eligible=False),
    "adam1e-3": Candidate(lambda r: optax.adam(1e-3), "reference: Adam 1e-3", agd_init=False,
                          eligible=False),
    "adam3e-3": Candidate(lambda r: optax.adam(3e-3), "reference: Adam 3e-3", agd_init=False,
                          eligible=False),
}  # fmt: skip
