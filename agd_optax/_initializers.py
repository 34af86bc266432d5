"""AGD's scaled orthogonal initialisation, as JAX initialisers and for whole parameter trees."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from agd_optax._layouts import Layout, _weight_layout, resolve_layouts
from agd_optax._roles import Role, as_role

__all__ = ["conv_init", "dense_init", "reinitialize", "scaled_orthogonal"]


def _orthogonal_weight(key: jax.Array, shape: tuple[int, ...], dtype: Any, lay: Layout):
    """Scaled semi-orthogonal weight: one Haar-random semi-orthogonal (d_in, d_out // groups) block per
    stack slice, kernel position and group, times s(W)."""
    ndim = len(shape)
    ins, outs = list(lay.in_axes), list(lay.out_axes)
    order = list(lay.stack_axes) + list(lay.spatial_axes) + ins + outs
    d_in = math.prod(shape[a] for a in ins)
    d_out = math.prod(shape[a] for a in outs)
    batch = math.prod(shape[a] for a in lay.stack_axes + lay.spatial_axes)
    groups = lay.groups
    base = jax.nn.initializers.orthogonal()
    keys = jax.random.split(key, batch * groups)
    # One block at a time (lax.map, not vmap): a batched QR on CPU splits its batch over XLA's
    # thread pool and waits for the pieces, and in jaxlib 0.10 two such QRs running at once
    # (two weights of one jitted initialisation) can take every thread of a small pool and
    # wait for each other forever. An unbatched QR runs on its own thread; the values are the same.
    blocks = jax.lax.map(lambda k: base(k, (d_in, d_out // groups), jnp.float32), keys)
    # (batch * groups, d_in, d_out/groups) -> (batch, d_in, groups * d_out/groups): groups side by side.
    blocks = blocks.reshape(batch, groups, d_in, d_out // groups).transpose(0, 2, 1, 3)
    w = blocks.reshape([shape[a] for a in order]) * lay.scale
    inverse = [order.index(a) for a in range(ndim)]
    return jnp.transpose(w, inverse).astype(dtype)


def scaled_orthogonal(role: Role | str = "dense"):
    """A JAX initialiser ``init(key, shape, dtype)`` for AGD's scaled orthogonal weights.

    A dense weight is a Haar-random semi-orthogonal ``d_in x d_out`` matrix times
    ``s(W) = sqrt(d_out / d_in)``; a convolution kernel gets an independent semi-orthogonal slice
    at each kernel position (and for each group), the whole kernel times
    ``s(W) = sqrt(d_out / d_in) / sqrt(positions)``. So every nonzero singular value of a dense
    weight, and of each position's slice of a conv, equals ``s(W)``.

    Args:
      role: the weight's role (:func:`agd_optax.dense`, :func:`agd_optax.conv`,
        :func:`agd_optax.embedding`, or their shorthand strings).

    Example:
      >>> import jax, agd_optax
      >>> from flax import nnx
      >>> layer = nnx.Linear(64, 16, use_bias=False, kernel_init=agd_optax.dense_init(),
      ...                    rngs=nnx.Rngs(0))
      >>> s = jax.numpy.linalg.svd(layer.kernel[...], compute_uv=False)
      >>> bool(jax.numpy.allclose(s, (16 / 64) ** 0.5, rtol=1e-5))
      True
    """
    weight = as_role(role, "<initializer>")
    if weight is None or weight.kind not in ("dense", "conv", "embedding"):
        raise ValueError(f"scaled_orthogonal initialises weights only, got role {weight}")

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(d) for d in shape)
        lay = _weight_layout(weight, shape, f"<{weight.kind} initializer>")
        return _orthogonal_weight(key, shape, dtype, lay)

    return init


def dense_init():
    """:func:`scaled_orthogonal` for Flax ``Linear``/``Dense`` kernels ``(d_in, d_out)``.

    Example:
      >>> import jax, agd_optax
      >>> w = agd_optax.dense_init()(jax.random.key(0), (8, 32))
      >>> bool(jax.numpy.allclose(w @ w.T, (32 / 8) * jax.numpy.eye(8), atol=1e-5))
      True
    """
    from agd_optax._roles import dense

    return scaled_orthogonal(dense())


def conv_init(groups: int = 1):
    """:func:`scaled_orthogonal` for Flax ``Conv`` kernels ``(*spatial, in // groups, out)``.

    Each kernel position (and group) is its own semi-orthogonal slice; the whole kernel is scaled
    by ``sqrt(d_out / d_in) / sqrt(positions)``.

    Example:
      >>> import jax, agd_optax
      >>> k = agd_optax.conv_init()(jax.random.key(0), (3, 3, 16, 16))
      >>> s = jax.numpy.linalg.svd(k[1, 2], compute_uv=False)  # One position's 16 x 16 slice.
      >>> bool(jax.numpy.allclose(s, 1 / 3, rtol=1e-5))
      True
    """
    from agd_optax._roles import conv

    return scaled_orthogonal(conv(groups=groups))


def reinitialize(key: jax.Array, params: Any, roles: Any = None) -> Any:
    """Re-initialises every dense, conv and embedding weight of ``params`` with AGD's scaled
    orthogonal initialisation; biases and norm-layer parameters are returned unchanged.

    Args:
      key: a PRNG key; each weight gets its own key, split in flattening order.
      params: the parameter pytree.
      roles: the same ``roles`` argument as :func:`agd_optax.agd` (``None`` infers them).

    Returns:
      A pytree of the same structure, dtypes and shardings-agnostic shapes as ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, agd_optax
      >>> params = {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
      >>> new = agd_optax.reinitialize(jax.random.key(0), params)
      >>> s = jnp.linalg.svd(new["dense"]["kernel"], compute_uv=False)
      >>> bool(jnp.allclose(s, (8 / 4) ** 0.5, rtol=1e-5)), bool((new["dense"]["bias"] == 0).all())
      (True, True)
    """
    if callable(roles) and not isinstance(roles, Role):
        roles = roles(params)
    layouts = resolve_layouts(params, roles)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x, lay in zip(keys, leaves, layouts):
        if lay.kind == "weight":
            out.append(_orthogonal_weight(k, tuple(x.shape), x.dtype, lay))
        else:
            out.append(x)
    return jax.tree.unflatten(treedef, out)
