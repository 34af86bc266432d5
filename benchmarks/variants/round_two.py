"""The second round's candidates (docs/agd_variants.md, "Round two"), as optax transformations
built from a model's roles.

Each keeps AGD's automatic parts: the depth ``L``, each weight's ``s(W)`` and a step ``eta``
formed from the gradient's norms by AGD's formula, and changes the direction a layer moves along:

* ``ortho_frob``: the orthogonalised momentum (Newton-Schulz, as Muon) at AGD's Frobenius budget;
* ``ortho_nuclear``: the orthogonalised momentum at spectral norm 1, ``eta`` from nuclear norms;
* ``hyper_gain``: ``agd_momentum`` whose gain hypergradient descent learns;
* ``adam_dir``: Adam's normalised direction, at AGD's per-layer step;
* ``scion_auto``: Scion's per-layer geometry, at AGD's per-layer step.

A weight's matrices are its kernel positions and stack slices, each ``(d_out, d_in)``; the
per-position convention is AGD's own (a convolution is normalised per kernel position).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import agd_optax
from agd_optax._floats import eta_of
from agd_optax._layouts import resolve_layouts
from agd_optax._step import agd_step, plan_of

# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024), five iterations.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.9


def _agd(leaves: list[jax.Array], layouts: list[Any]) -> tuple[list[jax.Array], jax.Array]:
    """AGD's normalised step of flat leaves (no gain, not negated) and its ``eta``."""
    acc = jnp.dtype(jnp.float32)
    steps, eta, _ = agd_step(leaves, plan_of(leaves, layouts, acc), acc)
    return steps, eta


def _ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b``, 0 where ``b`` is 0."""
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def _matrices(x: jax.Array, lay: Any) -> tuple[jax.Array, Any]:
    """A weight as a batch of ``(d_out, d_in)`` matrices, and the function that undoes it."""
    batch = tuple(lay.stack_axes) + tuple(lay.spatial_axes)
    order = batch + tuple(lay.out_axes) + tuple(lay.in_axes)
    order = order + tuple(a for a in range(x.ndim) if a not in order)  # Nothing else, in practice.
    moved = jnp.transpose(x, order)
    d_out = math.prod(x.shape[a] for a in lay.out_axes)
    d_in = moved.size // max(1, math.prod(x.shape[a] for a in batch)) // d_out
    mats = moved.reshape((-1, d_out, d_in))
    inverse = [order.index(a) for a in range(x.ndim)]

    def back(m: jax.Array) -> jax.Array:
        return jnp.transpose(m.reshape(moved.shape), inverse)

    return mats, back


def orthogonalise(mats: jax.Array) -> jax.Array:
    """Newton-Schulz's approximation of ``U V^T`` for each ``(d_out, d_in)`` matrix of a batch
    (singular values brought to about 0.7-1.2), in float32."""
    x = mats.astype(jnp.float32)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(NS_STEPS):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else jnp.swapaxes(x, -1, -2)


def _depth(layouts: list[Any]) -> int:
    return sum(lay.count for lay in layouts)


class MomentumState(NamedTuple):
    count: jax.Array  # shape=(), int32.
    m: Any  # Like the parameters: the running average 0.9 m + 0.1 g.


def _transformation(roles: Any, direction) -> optax.GradientTransformation:
    """Momentum 0.9 on the gradient; the update is ``direction(g, m, layouts)`` (flat leaves, the
    step to subtract)."""

    def init(params):
        return MomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        layouts = resolve_layouts(grads, roles)
        g, treedef = jax.tree.flatten(grads)
        m = [MOMENTUM * a + (1 - MOMENTUM) * b for a, b in zip(treedef.flatten_up_to(state.m), g)]
        steps = direction(g, m, layouts)
        updates = jax.tree.unflatten(treedef, [-u for u in steps])
        return updates, MomentumState(state.count + 1, jax.tree.unflatten(treedef, m))

    return optax.GradientTransformation(init, update)


def _momentum_steps(g, m, layouts) -> tuple[list[jax.Array], jax.Array]:
    """``agd_momentum``'s steps (the average's direction, ``eta`` from the gradient) and eta."""
    steps_m, eta_m = _agd(m, layouts)
    _, eta_g = _agd(g, layouts)
    ratio = _ratio(eta_g, eta_m)
    return [u * ratio for u in steps_m], eta_g


def ortho_frob(roles: Any) -> optax.GradientTransformation:
    """Each weight along its orthogonalised average ``O(m) / sqrt(min(d_in, d_out))`` per matrix
    (Frobenius norm about AGD's 1), times ``(eta / L) s(W)``, eta from the gradient; biases and
    norm-layer parameters as in ``agd_momentum``."""

    def direction(g, m, layouts):
        steps, eta = _momentum_steps(g, m, layouts)
        step = eta / _depth(layouts)
        out = []
        for u, x, lay in zip(steps, m, layouts):
            if lay.kind != "weight":
                out.append(u)
                continue
            mats, back = _matrices(x, lay)
            o = orthogonalise(mats) / math.sqrt(min(mats.shape[-2:]))
            out.append(back(o * (step * lay.scale)).astype(x.dtype))
        return out

    return _transformation(roles, direction)


def ortho_nuclear(roles: Any) -> optax.GradientTransformation:
    """Each weight along ``s(W) O(m)`` (spectral norm about 1 per matrix), with ``eta`` from
    ``G = (1/L) sum s ||g||_* / sqrt(min(d_in, d_out))``, ``||g||_* = <g, O(g)>`` per matrix;
    biases and norm-layer parameters at AGD's per-layer normalisation with the same ``eta``."""

    def direction(g, m, layouts):
        depth = _depth(layouts)
        total = jnp.zeros([], jnp.float32)
        for x, lay in zip(g, layouts):
            if lay.kind == "weight":
                mats, _ = _matrices(x, lay)
                mats = mats.astype(jnp.float32)
                nuclear = jnp.sum(mats * orthogonalise(mats))
                total = total + lay.scale * nuclear / math.sqrt(min(mats.shape[-2:]))
        eta = eta_of(total / depth)
        steps_m, eta_m = _agd(m, layouts)
        ratio = _ratio(eta, eta_m)
        out = []
        for u, x, lay in zip(steps_m, m, layouts):
            if lay.kind != "weight":
                out.append(u * ratio)
                continue
            mats, back = _matrices(x, lay)
            out.append(back(orthogonalise(mats) * (eta / depth * lay.scale)).astype(x.dtype))
        return out

    return _transformation(roles, direction)


def hyper_gain(roles: Any) -> optax.GradientTransformation:
    """``agd_momentum`` whose gain is learned online by the library's ``hypergradient`` (one
    level, its default hyper step, the gain on the log scale from 1)."""
    from agd_optax._hypergradient import HYPER_LEARNING_RATE

    return agd_optax.hypergradient(
        lambda gain: agd_optax.agd_momentum(gain, roles=roles),
        optax.sgd(HYPER_LEARNING_RATE),
        constraints={"gain": "exp"},
        gain=1.0,
    )


class AdamState(NamedTuple):
    count: jax.Array  # shape=(), int32.
    mu: Any  # Like the parameters: Adam's first moment.
    nu: Any  # Like the parameters: Adam's second moment.


def adam_dir(roles: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """AGD's step along Adam's direction: per leaf ``m_hat / (sqrt(v_hat) + eps)``, normalised
    per layer as AGD normalises the gradient, at ``(eta / L) s(W)`` with eta from the gradient."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        del params
        layouts = resolve_layouts(grads, roles)
        g, treedef = jax.tree.flatten(grads)
        count = state.count + 1
        mu = [b1 * a + (1 - b1) * x for a, x in zip(treedef.flatten_up_to(state.mu), g)]
        nu = [b2 * a + (1 - b2) * x * x for a, x in zip(treedef.flatten_up_to(state.nu), g)]
        c1, c2 = 1 - b1**count, 1 - b2**count
        d = [(a / c1) / (jnp.sqrt(b / c2) + eps) for a, b in zip(mu, nu)]
        steps_d, eta_d = _agd(d, layouts)
        _, eta_g = _agd(g, layouts)
        ratio = _ratio(eta_g, eta_d)
        updates = jax.tree.unflatten(treedef, [-u * ratio for u in steps_d])
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return updates, AdamState(count, unflat(mu), unflat(nu))

    return optax.GradientTransformation(init, update)


def _frobenius(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))


def scion_auto(roles: Any) -> optax.GradientTransformation:
    """Scion's per-layer geometry at AGD's per-layer step: the first weight (in the tree's order)
    column-normalised (each input feature's column to unit norm), the last row-normalised (each
    output's row), the others orthogonalised, biases and norm-layer parameters by sign; each
    layer's direction then rescaled to the Frobenius norm of ``agd_momentum``'s update of it."""

    def direction(g, m, layouts):
        steps, _ = _momentum_steps(g, m, layouts)
        weights = [i for i, lay in enumerate(layouts) if lay.kind == "weight"]
        first, last = weights[0], weights[-1]
        out = []
        for i, (u, x, lay) in enumerate(zip(steps, m, layouts)):
            if lay.kind != "weight":
                d = jnp.sign(x).astype(jnp.float32)
                axes = lay.reduce_axes
            else:
                mats, back = _matrices(x, lay)
                mats = mats.astype(jnp.float32)
                if i == first and i != last:
                    d = mats / (_frobenius(mats, (-2,)) + 1e-12)
                elif i == last and i != first:
                    d = mats / (_frobenius(mats, (-1,)) + 1e-12)
                else:
                    d = orthogonalise(mats)
                d = back(d)
                axes = lay.reduce_axes
            target = _frobenius(u, axes)
            out.append((d * (target / (_frobenius(d, axes) + 1e-30))).astype(x.dtype))
        return out

    return _transformation(roles, direction)
