"""Name inference reads a leaf only where Flax's names decide it; every misread it used to make
now reads right from unambiguous evidence or raises one RoleError naming every such leaf."""

import math

import jax
import jax.numpy as jnp
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
    with pytest.raises(RoleError, match=r"'kernel'.*depthwise"):
        agd_optax.resolve_layouts(params)
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
