"""AGD's norms for gradients whose squares overflow: each norm taken on a power-of-two rescaling.

The plain computation squares the gradient, so in float32 a leaf whose entries reach about 1e19
overflows to Inf although every gradient is finite (and the norm itself, up to 3.4e38, is not).
Here each group of entries summed into one norm (a weight's kernel position, a norm-layer
parameter) is first multiplied by ``2**-k``, with ``2**k`` the power of two just above its largest
magnitude, so the squares lie in [0, 1] and never overflow. Multiplying by a power of two is
exact, so wherever the plain computation does not overflow both agree to rounding; the norm
is kept as ``(sqrt(sum of scaled squares), k)`` and every product that could overflow (G, the
normalisation ``g / ||g||``) is formed on the scaled values. :func:`rescaled_step` is only run
when the plain squared norms overflowed (``lax.cond`` in ``_agd.py``), so the usual step costs no
extra pass over the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from agd_optax._layouts import Layout

# Above this G, eta = log((1 + sqrt(1 + 4 G)) / 2) is computed as log(G) / 2: they differ by
# about 1 / (2 sqrt(G)) = 2**-51, and sqrt(4 G) would overflow float32 near G = 8.5e37.
_LARGE_G_LOG2 = 100


def eta_of(G: jax.Array) -> jax.Array:
    """eta = log((1 + sqrt(1 + 4 G)) / 2), the step of a given G (SPEC.md)."""
    return jnp.log((1.0 + jnp.sqrt(1.0 + 4.0 * G)) / 2.0)


def _exponents(m: jax.Array) -> jax.Array:
    """k with 2**-k a normal number and m * 2**-k in [0.5, 1) when m is normal (0 for m == 0)."""
    info = jnp.finfo(m.dtype)
    _, k = jnp.frexp(m)
    return jnp.clip(k, int(info.minexp) + 1, int(info.maxexp) - 2)


def rescaled_step(
    grads: list[jax.Array],
    layouts: list[Layout],
    owners: list[int],
    acc: jnp.dtype,
    depth: int,
    sharding: Callable[[int, tuple[int, ...]], tuple[str, ...]],
    all_axes: tuple[str, ...],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The scalar part of the AGD step, overflow-free for any finite gradient.

    Pieces are ordered as in ``_agd.py``: every leaf's norms (one per kernel position and stack
    slice), then the whole norm of each weight in ``owners``. Returns ``(shifts, inverses, eta,
    G)``: per piece ``2**-k`` and ``eta / L / (norm * 2**-k)`` (0 for a zero norm), so that a leaf's
    update is ``(g * shift) * (s * inverse)``; and eta and G. G is Inf when it exceeds the dtype's
    range; eta is then log(G) / 2 computed from the scaled sum, finite.

    ``sharding(i, axes)`` gives the mesh axes that shard leaf ``i``'s ``axes`` (inside
    ``shard_map``); ``all_axes`` every mesh axis that shards some leaf (empty otherwise).
    """

    def psum(x, axes):
        return jax.lax.psum(x, axes) if axes else x

    def pmax(x, axes):
        return jax.lax.pmax(x, axes) if axes else x

    ssq, exps = [], []
    for i, (g, lay) in enumerate(zip(grads, layouts)):
        g = g.astype(acc)
        axes = sharding(i, lay.reduce_axes)
        m = pmax(jnp.max(jnp.abs(g), axis=lay.reduce_axes, keepdims=True), axes)
        k = _exponents(m)
        scaled = g * jnp.ldexp(jnp.ones([], acc), -k)
        ssq.append(psum(jnp.sum(jnp.square(scaled), axis=lay.reduce_axes, keepdims=True), axes))
        exps.append(k)
    for j in owners:  # A weight's whole norm: its positions' scaled sums on a common exponent.
        spatial = layouts[j].spatial_axes
        axes = sharding(j, spatial)
        top = pmax(jnp.max(exps[j], axis=spatial, keepdims=True), axes)
        whole = jnp.sum(jnp.ldexp(ssq[j], 2 * (exps[j] - top)), axis=spatial, keepdims=True)
        ssq.append(psum(whole, axes))
        exps.append(top)

    all_ssq = jnp.concatenate([q.ravel() for q in ssq])
    all_k = jnp.concatenate([k.ravel() for k in exps])
    all_r = jnp.sqrt(all_ssq)

    # G = 2**top * sum_k s_k r_k 2**(k - top), with top the largest exponent of a weight: the sum
    # is finite for finite gradients. Other leaves add 0 * their sums, so a NaN or Inf gradient
    # anywhere makes G NaN, as in the plain computation.
    offsets = np.cumsum([0] + [q.size for q in ssq]).tolist()
    is_weight = np.zeros(all_k.size, bool)
    scales = np.zeros(all_k.size)
    for i, lay in enumerate(layouts):
        if lay.kind == "weight":
            is_weight[offsets[i] : offsets[i + 1]] = True
            scales[offsets[i] : offsets[i + 1]] = lay.scale
    lowest = int(jnp.finfo(acc).minexp)
    top = pmax(jnp.max(jnp.where(is_weight, all_k, lowest)), all_axes)
    terms = jnp.ldexp(all_r, all_k - top)
    if not all_axes:
        total = jnp.dot(jnp.asarray(scales, acc), terms)
        total = total + 0.0 * jnp.dot(jnp.asarray(~is_weight, acc), all_ssq)
    else:
        total = jnp.zeros([], acc)
        for i, lay in enumerate(layouts):
            rest = tuple(a for a in range(grads[i].ndim) if a not in lay.reduce_axes)
            lo, hi = offsets[i], offsets[i + 1]
            part = lay.scale * jnp.sum(terms[lo:hi]) if lay.kind == "weight" else 0.0
            total = total + psum(part + 0.0 * jnp.sum(all_ssq[lo:hi]), sharding(i, rest))
    total = total + 0.0 * total
    G = jnp.ldexp(total / depth, top)
    log_G = jnp.log(total / depth) + top.astype(acc) * math.log(2.0)
    eta = jnp.where(G < 2.0**_LARGE_G_LOG2, eta_of(G), 0.5 * log_G)

    positive = all_r > 0
    inverses = jnp.where(positive, 1.0 / jnp.where(positive, all_r, 1.0), 0.0) * (eta / depth)
    shifts = jnp.ldexp(jnp.ones([], acc), -all_k)
    return shifts, inverses, eta, G
