"""The invariant: AGD's update does not depend on how a model is written down.

The same layers stacked (``nnx.vmap`` + ``nnx.scan``, ``nn.scan``) or unstacked get the same
update, read by ``trace_roles`` or by ``nnx_roles``; a CNN with BatchNorm and a depthwise
convolution gets the update of its hand-written roles.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import agd_optax

N, D, V = 3, 8, 11


def _update(grads, roles):
    tx = agd_optax.agd(roles=roles)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
    return updates, float(optax_eta(state))


def optax_eta(state):
    import optax

    return optax.tree.get(state, "eta")


def _random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def _unstack(tree, key):
    """``tree`` with its stacked subtree ``key`` split into ``{0: ..., 1: ...}``."""
    out = dict(tree)
    out[key] = {i: jax.tree.map(lambda x, i=i: x[i], tree[key]) for i in range(N)}
    return out


# NNX ----------------------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class ConvBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(D, D, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(D, rngs=rngs)
        self.depthwise = nnx.Conv(D, D, (3, 3), feature_group_count=D, rngs=rngs)

    def __call__(self, x):
        return x + self.depthwise(jax.nn.relu(self.bn(self.conv(x))))


class Stacked(nnx.Module):
    def __init__(self, block, rngs):
        self.embed = nnx.Linear(D, D, rngs=rngs)

        @nnx.split_rngs(splits=N)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, blk):
            return blk(x)

        return self.head(body(self.embed(x), self.blocks))


class Unstacked(nnx.Module):
    def __init__(self, block, rngs):
        self.embed = nnx.Linear(D, D, rngs=rngs)
        self.blocks = nnx.List([block(rngs) for _ in range(N)])
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def _nnx_roles_both_ways(model, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traced = agd_optax.trace_roles(
        lambda p, rest, x: nnx.merge(graphdef, p, rest)(x), params, rest, x
    )
    return nnx.to_pure_dict(params), {
        "trace_roles": traced,
        "nnx_roles": agd_optax.nnx_roles(model),
    }


@pytest.mark.parametrize(
    "block, shape", [(Block, (2, 5, D)), (ConvBlock, (2, 6, 6, D))], ids=["transformer", "conv"]
)
def test_nnx_stacked_blocks_get_the_update_of_unstacked_blocks(block, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    stacked = nnx.eval_shape(lambda: Stacked(block, nnx.Rngs(0)))
    unstacked = nnx.eval_shape(lambda: Unstacked(block, nnx.Rngs(0)))
    s_params, s_roles = _nnx_roles_both_ways(stacked, x)
    u_params, u_roles = _nnx_roles_both_ways(unstacked, x)
    grads = _random_like(s_params)
    reference, eta = _update(_unstack(grads, "blocks"), u_roles["nnx_roles"])
    assert eta > 0
    for how in ("trace_roles", "nnx_roles"):
        u_updates, u_eta = _update(_unstack(grads, "blocks"), u_roles[how])
        s_updates, s_eta = _update(grads, s_roles[how])
        chex.assert_trees_all_close(_unstack(s_updates, "blocks"), reference, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(u_updates, reference, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([s_eta, u_eta], eta, rtol=1e-6)
    # Every stacked leaf, norm-layer parameters included, is normalised per layer.
    layouts = agd_optax.resolve_layouts(s_params, s_roles["nnx_roles"])
    assert all(lay.stack_axes == (0,) for lay in layouts if "blocks" in lay.path)
    assert sum(lay.count for lay in layouts) == 2 + N * (6 if block is Block else 2)


# Linen --------------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
            nn.LayerNorm(name="ln1")(x)
        )
        h = nn.Dense(2 * D, name="fc1")(nn.LayerNorm(name="ln2")(x))
        return x + nn.Dense(D, name="fc2")(jax.nn.gelu(h)), None


class LinenModel(nn.Module):
    scanned: bool

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        if self.scanned:
            scan = nn.scan(
                LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=N
            )
            x, _ = scan(name="blocks")(x, None)
        else:
            for i in range(N):
                x, _ = LinenBlock(name=f"block{i}")(x)
        return nn.Dense(V, name="head")(x)


def test_linen_scanned_blocks_get_the_update_of_unrolled_blocks():
    x = jnp.zeros((2, 5, D))
    params = {}
    roles = {}
    for scanned in (True, False):
        model = LinenModel(scanned)
        p = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        params[scanned] = p
        roles[scanned] = agd_optax.trace_roles(
            lambda p, x, m=model: m.apply({"params": p}, x), p, x
        )
    grads = _random_like(params[True])
    unrolled = {k: v for k, v in grads.items() if k != "blocks"}
    for i in range(N):
        unrolled[f"block{i}"] = jax.tree.map(lambda g, i=i: g[i], grads["blocks"])
    s_updates, s_eta = _update(grads, roles[True])
    u_updates, u_eta = _update(unrolled, roles[False])
    for i in range(N):
        chex.assert_trees_all_close(
            jax.tree.map(lambda u, i=i: u[i], s_updates["blocks"]),
            u_updates[f"block{i}"],
            rtol=1e-5,
            atol=1e-7,
        )
    chex.assert_trees_all_close(s_updates["head"], u_updates["head"], rtol=1e-5)
    np.testing.assert_allclose(s_eta, u_eta, rtol=1e-6)
    # Names read the scanned attention and MLP kernels right, and refuse the stacked norms.
    with pytest.raises(agd_optax.RoleError, match="blocks/ln1/scale(.|\n)*trace_roles"):
        agd_optax.resolve_layouts(params[True])


# A CNN with BatchNorm and a depthwise convolution, against hand-written roles ---------------


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, use_bias=False, rngs=rngs)
        self.pointwise = nnx.Conv(8, 16, (1, 1), rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.stem(x)))
        x = jax.nn.relu(self.pointwise(self.depthwise(x)))
        return self.head(x.mean(axis=(1, 2)))


def test_cnn_with_batchnorm_and_depthwise_conv_matches_explicit_roles():
    model = nnx.eval_shape(lambda: CNN(nnx.Rngs(0)))
    params, found = _nnx_roles_both_ways(model, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
    explicit = {
        "stem": {"kernel": agd_optax.conv(), "bias": agd_optax.bias()},
        "bn": agd_optax.norm(),
        "depthwise": {"kernel": agd_optax.conv(groups=8)},
        "pointwise": {"kernel": agd_optax.conv(), "bias": agd_optax.bias()},
        "head": {"kernel": agd_optax.dense(), "bias": agd_optax.bias()},
    }
    grads = _random_like(params)
    reference, eta = _update(grads, explicit)
    for roles in found.values():
        updates, found_eta = _update(grads, roles)
        chex.assert_trees_all_close(updates, reference, rtol=1e-6)
        np.testing.assert_allclose(found_eta, eta, rtol=1e-6)
    depthwise = agd_optax.resolve_layouts(params, explicit)[2]
    assert depthwise.path == "depthwise/kernel" and depthwise.scale == pytest.approx(1 / 3)
