"""Leaf roles: inference from Flax names, explicit roles, nnx_roles, and the errors."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import agd_optax
from agd_optax import RoleError


def _layouts(params, roles=None):
    lays = agd_optax.resolve_layouts(params, roles)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {"/".join(str(getattr(k, "key", k)) for k in p): lay for p, lay in zip(paths, lays)}


def test_infers_flax_names():
    params = {
        "dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)},
        "conv": {"kernel": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros(8)},
        "conv3d": {"kernel": jnp.zeros((2, 3, 3, 4, 8)), "bias": jnp.zeros(8)},  # not stacked
        "embed": {"embedding": jnp.zeros((100, 16))},
        "ln": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
        "attn": {
            "query": {"kernel": jnp.zeros((16, 2, 8)), "bias": jnp.zeros((2, 8))},
            "key": {"kernel": jnp.zeros((16, 2, 8))},
            "value": {"kernel": jnp.zeros((16, 2, 8))},
            "out": {"kernel": jnp.zeros((2, 8, 16)), "bias": jnp.zeros(16)},
        },
    }
    roles = agd_optax.infer_roles(params)
    assert roles["dense"]["kernel"].kind == "dense"
    assert roles["dense"]["bias"].kind == "bias"
    assert roles["conv"]["kernel"].kind == "conv"
    assert roles["embed"]["embedding"].kind == "embedding"
    assert roles["ln"]["scale"].kind == roles["ln"]["bias"].kind == "norm"
    lay = _layouts(params)
    assert lay["dense/kernel"].scale == pytest.approx(math.sqrt(5 / 3))
    assert lay["conv/kernel"].scale == pytest.approx(math.sqrt(8 / 4) / 3)
    assert lay["conv/kernel"].reduce_axes == (2, 3) and lay["conv/kernel"].spatial_axes == (0, 1)
    assert lay["conv3d/kernel"].scale == pytest.approx(math.sqrt(8 / 4) / math.sqrt(18))
    assert lay["embed/embedding"].scale == pytest.approx(math.sqrt(100 / 16))
    assert lay["attn/query/kernel"].scale == pytest.approx(1.0)  # 16 -> 2 * 8
    assert lay["attn/out/kernel"].in_axes == (0, 1) and lay["attn/out/kernel"].out_axes == (2,)
    # Biases and norm-layer parameters count neither in L nor in G.
    assert sum(x.count for x in lay.values()) == 8
    assert lay["dense/bias"].kind == "bias" and lay["dense/bias"].scale == lay["dense/kernel"].scale
    assert lay["ln/scale"].kind == "norm"


def test_linen_param_dict_is_inferred():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.LayerNorm()(x)
            x = nn.MultiHeadDotProductAttention(num_heads=2)(x.reshape(x.shape[0], -1, 8))
            return nn.Dense(3)(x)

    params = Net().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    layouts = agd_optax.resolve_layouts(params)
    assert sum(lay.count for lay in layouts) == 6  # conv, q, k, v, out, dense
    assert {lay.kind for lay in layouts} == {"weight", "bias", "norm"}


def test_nnx_state_paths_with_and_without_variables():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    a = agd_optax.resolve_layouts(state)
    b = agd_optax.resolve_layouts(nnx.to_pure_dict(state))
    assert a == b
    assert sorted(lay.kind for lay in a) == ["bias", "norm", "norm", "weight"]


def test_nnx_roles_reads_module_types():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 16, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False, rngs=rngs)
            self.depthwise = nnx.Conv(16, 16, (3,), feature_group_count=16, rngs=rngs)
            self.conv1d = nnx.Conv(16, 32, (5,), rngs=rngs)
            self.grouped = nnx.Conv(32, 64, (3, 3), feature_group_count=4, rngs=rngs)
            self.norm = nnx.RMSNorm(16, rngs=rngs)

    model = Model(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    # Without the model's types, the 3-axis 1-D conv kernels are ambiguous: a clear error.
    with pytest.raises(RoleError, match="conv1d/kernel"):
        agd_optax.resolve_layouts(params)
    lay = _layouts(nnx.to_pure_dict(params), agd_optax.nnx_roles(model))
    assert lay["depthwise/kernel"].scale == pytest.approx(1 / math.sqrt(3))  # 1 -> 1 per group
    assert lay["conv1d/kernel"].scale == pytest.approx(math.sqrt(32 / 16) / math.sqrt(5))
    assert lay["grouped/kernel"].scale == pytest.approx(math.sqrt(64 / 32) / 3)
    assert lay["attn/query/kernel"].out_axes == (1, 2)
    assert lay["attn/out/kernel"].in_axes == (0, 1)
    assert lay["norm/scale"].kind == "norm"
    assert lay["embed/embedding"].scale == pytest.approx(math.sqrt(50 / 16))


def test_explicit_prefix_pytree_and_callable_roles():
    params = {"a": {"w": jnp.zeros((4, 6))}, "b": {"w": jnp.zeros((6, 2)), "c": jnp.zeros(2)}}
    with pytest.raises(RoleError, match="'a/w'"):
        agd_optax.resolve_layouts(params)
    torch_dense = agd_optax.dense(in_axes=1, out_axes=0)
    prefix = {"a": torch_dense, "b": {"w": "dense", "c": agd_optax.bias(owner="b/w")}}
    lay = _layouts(params, prefix)
    assert lay["a/w"].scale == pytest.approx(math.sqrt(4 / 6))
    assert lay["b/w"].scale == pytest.approx(math.sqrt(2 / 6))
    assert lay["b/c"].owner == 2 and lay["b/c"].scale == lay["b/w"].scale  # leaves: a/w, b/c, b/w
    same = _layouts(
        params,
        lambda p: (
            jax.tree.map(lambda _: "dense", p) | {"b": {"w": "dense", "c": agd_optax.bias("b/w")}}
        ),
    )
    assert same["b/c"].owner == 2
    # A single role applies to every leaf.
    assert all(x.kind == "weight" for x in _layouts({"x": jnp.zeros((2, 3))}, "dense").values())


def test_stacked_weights_count_per_slice():
    params = {"layers": {"kernel": jnp.zeros((6, 8, 4)), "bias": jnp.zeros((6, 4))}}
    roles = {"layers": {"kernel": agd_optax.dense(stack_axes=0), "bias": "bias"}}
    lay = _layouts(params, roles)
    assert lay["layers/kernel"].count == 6
    assert lay["layers/kernel"].scale == pytest.approx(math.sqrt(4 / 8))
    assert lay["layers/bias"].stack_axes == (0,)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"x": {"kernel": jnp.zeros((3, 4, 5))}}, r"'x/kernel'.*3-axis kernel"),
        ({"x": {"weight": jnp.zeros((3, 4))}}, r"'x/weight'.*not a Flax parameter name"),
        ({"x": {"kernel": jnp.zeros(3)}}, r"'x/kernel'.*1 axes"),
        ({"x": {"bias": jnp.zeros((3, 4))}}, r"'x/bias'"),
        ({"x": {"scale": jnp.zeros((3, 4))}}, r"'x/scale'"),
        ({"ln": {"scale": jnp.ones(3)}}, r"at least one dense, conv or embedding weight"),
    ],
)
def test_undecidable_leaves_raise_naming_the_path(params, match):
    with pytest.raises(RoleError, match=match):
        agd_optax.resolve_layouts(params)
    with pytest.raises(RoleError, match=match):
        agd_optax.agd().init(params)


def test_roles_tree_that_does_not_match_raises():
    params = {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"kernel": jnp.zeros((3, 2))}}
    with pytest.raises(RoleError, match="does not match.*no role for leaf 'b/kernel'"):
        agd_optax.resolve_layouts(params, {"a": "dense"})
    with pytest.raises(RoleError, match=r"does not match.*\['c'\] match no parameter"):
        agd_optax.resolve_layouts(params, {"a": "dense", "b": "dense", "c": "dense"})
    with pytest.raises(RoleError, match="'b/kernel'.*42"):
        agd_optax.resolve_layouts(params, {"a": "dense", "b": {"kernel": 42}})
    with pytest.raises(RoleError, match="'a/kernel'.*out of range"):
        agd_optax.resolve_layouts(params, {"a": agd_optax.dense(0, 2), "b": "dense"})
    with pytest.raises(RoleError, match="'a/kernel'.*twice"):
        agd_optax.resolve_layouts(
            params, {"a": agd_optax.conv(spatial_axes=(), in_axis=0, out_axis=0), "b": "dense"}
        )
    with pytest.raises(RoleError, match=r"'x/kernel'.*axes \[2\] without a part"):
        agd_optax.resolve_layouts({"x": {"kernel": jnp.zeros((2, 3, 4))}}, agd_optax.dense(0, 1))


def test_bias_without_owner_raises():
    with pytest.raises(RoleError, match="'x/bias'.*'x/kernel'"):
        agd_optax.resolve_layouts(
            {"x": {"bias": jnp.zeros(3)}, "y": {"kernel": jnp.zeros((3, 3))}},
            {"x": {"bias": "bias"}, "y": "dense"},
        )


@pytest.mark.parametrize(
    "leaf, error, match",
    [
        (jnp.zeros((2, 3), jnp.int32), TypeError, "int32"),
        (jnp.zeros((2, 3), jnp.complex64), TypeError, "complex"),
        (jnp.zeros((0, 3)), ValueError, "empty"),
        (np.zeros((2, 3), bool), TypeError, "bool"),
    ],
)
def test_bad_leaves_raise_naming_the_leaf(leaf, error, match):
    params = {"good": {"kernel": jnp.zeros((3, 3))}, "bad": {"kernel": leaf}}
    with pytest.raises(error, match=f"'bad/kernel'.*{match}|{match}.*'bad/kernel'"):
        agd_optax.agd().init(params)
    tx = agd_optax.agd()
    state = tx.init({"good": {"kernel": jnp.zeros((3, 3))}, "bad": {"kernel": jnp.zeros((3, 3))}})
    with pytest.raises(error, match="'bad/kernel'"):
        tx.update(params, state)


def test_update_params_with_other_structure_raises():
    params = {"a": {"kernel": jnp.zeros((2, 3))}}
    tx = agd_optax.agd()
    state = tx.init(params)
    with pytest.raises(ValueError, match="only in params.*'b/kernel'"):
        tx.update(params, state, params | {"b": {"kernel": jnp.zeros((3, 2))}})


def test_bad_role_arguments_raise():
    with pytest.raises(RoleError, match="groups"):
        agd_optax.conv(groups=0)
    with pytest.raises(RoleError, match="unknown role kind"):
        agd_optax.Role("lstm")
    with pytest.raises(RoleError, match="divisible"):
        agd_optax.resolve_layouts(
            {"c": {"kernel": jnp.zeros((3, 3, 2, 6))}}, {"c": {"kernel": agd_optax.conv(groups=4)}}
        )


def test_plain_dict_roles_fit_an_nnx_state():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    roles = {"layers": {0: {"kernel": agd_optax.dense(1, 0), "bias": "norm"}, 1: "norm"}}
    lay = agd_optax.resolve_layouts(state, roles)
    weight = next(x for x in lay if x.kind == "weight")
    assert weight.scale == pytest.approx(math.sqrt(3 / 4))  # read as (out, in): 4 -> 3
    assert sorted(x.kind for x in lay) == ["norm", "norm", "norm", "weight"]
    # As a bias, the (4,) leaf would not fit a kernel read as (out=3, in=4).
    roles["layers"][0]["bias"] = "bias"
    with pytest.raises(RoleError, match=r"'layers/0/bias'.*does not fit.*'layers/0/kernel'"):
        agd_optax.resolve_layouts(state, roles)


def test_a_bias_whose_weight_has_a_zero_gradient_does_not_move_as_documented():
    """AGD's bias rule scales the bias's gradient by its weight's, 0 when that is 0: with inputs
    all zero the kernel's gradient is exactly zero and the bias stays, though its own gradient
    is not zero. docs/roles.md says so."""
    params = {"dense": {"kernel": jnp.full((4, 3), 0.1), "bias": jnp.zeros(3)}}
    x, y = jnp.zeros((8, 4)), jnp.ones((8, 3))
    grads = jax.grad(
        lambda p: jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"][None] - y) ** 2)
    )(params)
    assert float(jnp.abs(grads["dense"]["bias"]).min()) > 0
    np.testing.assert_array_equal(grads["dense"]["kernel"], 0.0)
    tx = agd_optax.agd()
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
    roles_page = os.path.join(os.path.dirname(__file__), "..", "docs", "roles.md")
    text = " ".join(open(roles_page).read().split())
    assert "a bias whose weight's gradient is exactly zero" in text and "never moves" in text
