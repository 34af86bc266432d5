"""Name inference reads a leaf only where Flax's names decide it; every misread it used to make
now reads right from unambiguous evidence or raises one RoleError naming every such leaf."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import agd_optax
from agd_optax import RoleError


def _lay(params, roles=None):
    layouts = agd_optax.resolve_layouts(params, roles)
    return {lay.path: lay for lay in layouts}


def test_stacked_attention_kernels_read_from_their_names():
    # nn.scan-stacked attention (layers, d_model, heads, head_dim): not a 2-D convolution.
    params = {
        "attn": {
            "query": {"kernel": jnp.zeros((6, 16, 2, 8)), "bias": jnp.zeros((6, 2, 8))},
            "key": {"kernel": jnp.zeros((6, 16, 2, 8))},
            "value": {"kernel": jnp.zeros((6, 16, 2, 8))},
            "out": {"kernel": jnp.zeros((6, 2, 8, 16)), "bias": jnp.zeros((6, 16))},
        }
    }
    lay = _lay(params)
    assert lay["attn/query/kernel"].count == 6 and lay["attn/query/kernel"].scale == 1.0
    assert lay["attn/query/kernel"].in_axes == (1,) and lay["attn/out/kernel"].out_axes == (3,)
    assert lay["attn/out/bias"].stack_axes == (0,)


def test_stack_read_from_the_bias_and_from_linen_class_names():
    params = {
        "mlp": {"kernel": jnp.zeros((4, 8, 16)), "bias": jnp.zeros((4, 16))},  # stacked Dense
        "convs": {"kernel": jnp.zeros((4, 3, 3, 8, 8)), "bias": jnp.zeros((4, 8))},  # stacked conv
        "Dense_0": {"kernel": jnp.zeros((4, 8, 16))},  # Linen Dense: always 2 axes per layer
        "ConvLocal_0": {"kernel": jnp.zeros((5, 5, 18, 6))},  # one dense weight per position
    }
    lay = _lay(params)
    assert lay["mlp/kernel"].count == 4 and lay["mlp/kernel"].stack_axes == (0,)
    assert lay["convs/kernel"].count == 4 and lay["convs/kernel"].spatial_axes == (1, 2)
    assert lay["Dense_0/kernel"].count == 4
    assert lay["ConvLocal_0/kernel"].count == 25
    assert lay["ConvLocal_0/kernel"].scale == pytest.approx(math.sqrt(6 / 18))


def test_pytorch_layout_kernel_read_from_its_bias():
    lay = _lay({"fc": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(32)}})
    assert lay["fc/kernel"].in_axes == (1,) and lay["fc/kernel"].out_axes == (0,)
    assert lay["fc/kernel"].scale == pytest.approx(math.sqrt(32 / 10))
    with pytest.raises(RoleError, match=r"'fc/kernel'.*fits neither"):
        agd_optax.resolve_layouts({"fc": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(5)}})


def test_linen_depthwise_conv_is_refused_and_traced_exactly():
    model = nn.Conv(16, (3, 3), feature_group_count=16)
    x = jnp.zeros((1, 8, 8, 16))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    with pytest.raises(RoleError, match=r"'kernel'.*no module name"):
        agd_optax.resolve_layouts(params)  # At the root: names say nothing of a convolution.
    with pytest.raises(RoleError, match=r"'conv/kernel'.*depthwise"):
        agd_optax.resolve_layouts({"conv": params})
    roles = agd_optax.trace_roles(lambda p, x: model.apply({"params": p}, x), params, x)
    assert _lay(params, roles)["kernel"].scale == pytest.approx(1 / 3)  # not 1.886


@pytest.mark.parametrize(
    "params, match",
    [
        # A fused qkv projection is not a convolution.
        ({"attn": {"qkv": {"kernel": jnp.zeros((3, 4, 16, 8))}}}, r"'attn/qkv/kernel'.*fused"),
        # A stacked conv without a bias: 3-D conv or a stack of 2-D convs.
        ({"c": {"kernel": jnp.zeros((4, 3, 3, 8, 8))}}, r"'c/kernel'.*5-axis"),
        # A stacked norm: normalised per layer only with norm(stack_axes=...).
        ({"ln": {"scale": jnp.ones((4, 8)), "bias": jnp.zeros((4, 8))}}, r"'ln/scale'.*stack_axes"),
        # A bias whose weight is named 'weight', or is not in the tree, is not a norm parameter.
        ({"fc": {"weight": jnp.zeros((4, 3)), "bias": jnp.zeros(4)}}, r"'fc/bias'.*pytorch_roles"),
        ({"fc": {"bias": jnp.zeros(4)}}, r"'fc/bias'.*no 'kernel'"),
        ({"up": {"ConvTranspose_0": {"kernel": jnp.zeros((3, 3, 4, 8))}}}, "ConvTranspose"),
    ],
)
def test_ambiguous_leaves_raise(params, match):
    params = params | {"head": {"kernel": jnp.zeros((8, 2))}}
    with pytest.raises(RoleError, match=match):
        agd_optax.resolve_layouts(params)


def test_one_error_lists_every_undecidable_leaf_with_its_fix():
    params = {
        "a": {"kernel": jnp.zeros((3, 4, 5))},
        "b": {"bias": jnp.zeros(3)},
        "c": {"scale": jnp.ones((2, 3))},
        "d": {"kernel": jnp.zeros((3, 3, 1, 8))},
        "ok": {"kernel": jnp.zeros((4, 4))},
    }
    for call in (agd_optax.resolve_layouts, agd_optax.infer_roles, agd_optax.agd().init):
        with pytest.raises(RoleError) as e:
            call(params)
        msg = str(e.value)
        assert "4 leaves" in msg and "'ok/kernel'" not in msg
        for leaf in ("'a/kernel'", "'b/bias'", "'c/scale'", "'d/kernel'"):
            line = next(x for x in msg.splitlines() if leaf in x)
            assert "fix:" in line
        assert "trace_roles" in msg and "nnx_roles" in msg


def test_bias_that_does_not_fit_its_owner_names_the_leaf():
    params = {"l": {"kernel": jnp.zeros((4, 8)), "b": jnp.zeros(4)}}
    with pytest.raises(RoleError, match=r"'l/b'.*\(4,\).*does not fit.*'l/kernel'"):
        agd_optax.resolve_layouts(
            params, {"l": {"kernel": "dense", "b": agd_optax.bias("l/kernel")}}
        )


def test_pytorch_roles_on_a_state_dict():
    state_dict = {
        "conv1.weight": jnp.zeros((8, 3, 3, 3)),
        "conv1.bias": jnp.zeros(8),
        "bn1.weight": jnp.ones(8),
        "bn1.bias": jnp.zeros(8),
        "fc.weight": jnp.zeros((10, 8)),
        "fc.bias": jnp.zeros(10),
    }
    lay = _lay(state_dict, agd_optax.pytorch_roles)
    assert lay["conv1.weight"].spatial_axes == (2, 3)
    assert lay["conv1.weight"].scale == pytest.approx(math.sqrt(8 / 3) / 3)
    assert lay["fc.weight"].scale == pytest.approx(math.sqrt(10 / 8))
    assert lay["fc.bias"].kind == "bias" and lay["fc.bias"].scale == lay["fc.weight"].scale
    assert lay["bn1.weight"].kind == lay["bn1.bias"].kind == "norm"
    # Nested trees work the same; what the shapes do not decide is listed, and overridable.
    nested = {
        "emb": {"weight": jnp.zeros((100, 8))},
        "dw": {"weight": jnp.zeros((8, 1, 3, 3))},
        "bn": {"running_mean": jnp.zeros(8)},
        "fc": {"weight": jnp.zeros((2, 8))},
    }
    with pytest.raises(RoleError, match=r"2 leaves(.|\n)*'dw/weight'") as error:
        agd_optax.resolve_layouts(nested, agd_optax.pytorch_roles)
    assert "emb/weight" not in str(error.value)  # An nn.Embedding table needs no override.
    roles = agd_optax.pytorch_roles(
        overrides={
            "dw.weight": agd_optax.conv((2, 3), 1, 0, groups=8),
            "bn": agd_optax.norm(),
        }
    )
    lay = _lay(nested, roles)
    assert lay["dw/weight"].scale == pytest.approx(1 / 3)
    assert lay["emb/weight"].scale == pytest.approx(math.sqrt(100 / 8))
    # The table reads as an embedding, the same map (dim -> num) as a Linear weight (out, in).
    table = {"emb": {"weight": jnp.zeros((100, 8))}}
    as_linear = _lay(table, {"emb": {"weight": agd_optax.dense(in_axes=1, out_axes=0)}})
    assert as_linear["emb/weight"] == _lay(table, agd_optax.pytorch_roles)["emb/weight"]


# --------------------------------------------------------------------------------------------------
# Names read only what names decide: a kernel with axes beyond (in, out) is a convolution only under
# a module named as one, and `out` an attention output only beside `query`, `key` and `value`.


def _refusal(params):
    with pytest.raises(RoleError) as error:
        agd_optax.resolve_layouts(params)
    msg = str(error.value)
    lines = msg.splitlines()
    # The one-liner that reads every leaf comes first, then each leaf with its own fix.
    assert "agd_optax.trace_roles(forward_fn, params, *inputs)" in lines[1]
    return msg


def _traced(module, params, x):
    roles = agd_optax.trace_roles(lambda p, x: module.apply({"params": p}, x), params, x)
    return _lay(params, roles)


def test_multi_axis_kernel_under_a_plain_name_is_refused_and_traced_as_stacked_maps():
    # (4, 32, 4, 8): four stacked 32 -> 4 x 8 maps, not a 2-D convolution with 128 positions.
    params = {"proj": {"kernel": jnp.zeros((4, 32, 4, 8))}, "head": {"kernel": jnp.zeros((32, 2))}}
    msg = _refusal(params)
    line = next(x for x in msg.splitlines() if "'proj/kernel' (4, 32, 4, 8)" in x)
    assert "neither convolution" in line and "fix: trace_roles" in line
    assert "head/kernel" not in msg

    def forward(p, x):
        for layer in range(4):  # One slice per layer: the leading axis is a stack.
            x = jnp.einsum("bi,ihd->bhd", x, p["proj"]["kernel"][layer]).reshape(x.shape[0], 32)
        return x @ p["head"]["kernel"]

    roles = agd_optax.trace_roles(forward, params, jax.ShapeDtypeStruct((2, 32), jnp.float32))
    lay = _lay(params, roles)["proj/kernel"]
    assert (lay.stack_axes, lay.in_axes, lay.out_axes, lay.count) == ((0,), (1,), (2, 3), 4)
    assert lay.scale == 1.0 and lay.spatial_axes == ()


class _UNetTail(nn.Module):
    """A convolution named `out`, as a U-Net's last layer usually is."""

    use_bias: bool

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        return nn.Conv(3, (3, 3), use_bias=self.use_bias, name="out")(x)


@pytest.mark.parametrize("use_bias", [False, True], ids=["no_bias", "bias"])
def test_convolution_named_out_is_refused_and_traced_as_a_convolution(use_bias):
    model, x = _UNetTail(use_bias), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert params["out"]["kernel"].shape == (3, 3, 8, 3)
    msg = _refusal(params)
    line = next(x for x in msg.splitlines() if "'out/kernel' (3, 3, 8, 3)" in x)
    # The error says that the name made it attention, and why it does not here.
    assert "only beside 'query', 'key' and 'value'" in line and "stack" in line
    assert "conv1/kernel" not in msg  # A convolution's name reads it.
    lay = _traced(model, params, x)["out/kernel"]
    assert lay.spatial_axes == (0, 1) and lay.scale == pytest.approx(math.sqrt(3 / 8) / 3)
    # Beside query, key and value, the same name is an attention output projection.
    attention = {name: {"kernel": jnp.zeros((8, 2, 4))} for name in ("query", "key", "value")} | {
        "out": {"kernel": jnp.zeros((2, 4, 8))}
    }
    lay = _lay({"attn": attention})["attn/out/kernel"]
    assert lay.in_axes == (0, 1) and lay.out_axes == (2,)


class _ResNet18LocalStem(nn.Module):
    """The stem of the Flax ImageNet example's ResNet18Local: an unshared-weight convolution."""

    @nn.compact
    def __call__(self, x):
        pad = [(3, 3), (3, 3)]
        return nn.ConvLocal(8, (7, 7), (2, 2), pad, use_bias=False, name="conv_init")(x)


def test_conv_local_named_conv_init_is_refused_and_traced_as_separate_maps():
    model, x = _ResNet18LocalStem(), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert params["conv_init"]["kernel"].shape == (16, 16, 147, 8)
    msg = _refusal(params)
    assert "'conv_init/kernel' (16, 16, 147, 8)" in msg and "ConvLocal" in msg
    lay = _traced(model, params, x)["conv_init/kernel"]
    # 256 separate maps 147 -> 8, one per output position; not one convolution.
    assert lay.count == 256 and lay.stack_axes == (0, 1) and lay.spatial_axes == ()
    assert lay.scale == pytest.approx(math.sqrt(8 / 147))
    # Linen's own name for it, ConvLocal_0, reads the same.
    assert agd_optax.resolve_layouts({"ConvLocal_0": params["conv_init"]}) == [
        dataclasses.replace(lay, path="ConvLocal_0/kernel")
    ]


@pytest.mark.parametrize(
    "name, is_conv",
    [
        ("conv", True),
        ("Conv_0", True),
        ("conv1", True),
        ("conv2d", True),
        ("convs/0", True),  # A list's entries are named by the list.
        ("stem_conv", True),
        ("conv_init", False),
        ("conv_in", False),
        ("deconv", False),
        ("proj", False),
        ("layers/0", False),
    ],
)
def test_which_module_names_say_convolution(name, is_conv):
    params = {}
    node = params
    for key in name.split("/"):
        node = node.setdefault(key, {})
    node["kernel"] = jnp.zeros((3, 3, 4, 8))
    if is_conv:
        [lay] = agd_optax.resolve_layouts(params)
        assert lay.spatial_axes == (0, 1)
    else:
        with pytest.raises(RoleError, match="neither convolution"):
            agd_optax.resolve_layouts(params)


def test_convolution_as_patches_and_matmul_needs_its_role_given():
    """The example of docs/roles.md: trace_roles reads `patches @ kernel` as a dense map (the
    convolution's scale, one norm instead of one per position); the conv role, given, makes the
    update exactly the convolution's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 8, 8, 8)), jnp.float32)
    hwio = jnp.asarray(rng.standard_normal((3, 3, 3, 8)) / 3, jnp.float32)
    dims = ("NHWC", "HWIO", "NHWC")

    def conv(p, x):
        return jax.lax.conv_general_dilated(
            x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=dims
        )

    def patches(p, x):
        pt = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME", dimension_numbers=dims)
        kernel = p["conv"]["kernel"]  # (in, kh, kw, out): the patches' feature order.
        return pt @ kernel.reshape(-1, kernel.shape[-1])

    p_conv = {"conv": {"kernel": hwio}}
    p_patches = {"conv": {"kernel": jnp.transpose(hwio, (2, 0, 1, 3))}}
    np.testing.assert_allclose(conv(p_conv, x), patches(p_patches, x), atol=1e-5)

    def step(fn, params, roles):
        grads = jax.grad(lambda p: jnp.mean((fn(p, x) - y) ** 2))(params)
        tx = agd_optax.agd(roles=roles)
        updates, state = tx.update(grads, tx.init(params), params)
        return updates["conv"]["kernel"], float(optax.tree.get(state, "eta"))

    want, eta = step(conv, p_conv, agd_optax.trace_roles(conv, p_conv, x))
    traced = agd_optax.trace_roles(patches, p_patches, x)
    lay = _lay(p_patches, traced)["conv/kernel"]
    assert lay.in_axes == (0, 1, 2) and lay.spatial_axes == ()  # A dense map, fan-in 27.
    assert lay.scale == pytest.approx(_lay(p_conv, None)["conv/kernel"].scale)
    _, eta_traced = step(patches, p_patches, traced)
    assert eta_traced == pytest.approx(0.364, abs=1e-3) and eta == pytest.approx(0.671, abs=1e-3)
    role = {"conv": {"kernel": agd_optax.conv(spatial_axes=(1, 2), in_axis=0, out_axis=3)}}
    got, eta_given = step(patches, p_patches, role)
    np.testing.assert_allclose(jnp.transpose(got, (1, 2, 0, 3)), want, rtol=1e-5, atol=1e-7)
    assert eta_given == pytest.approx(eta, rel=1e-6)
