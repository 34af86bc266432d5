"""trace_roles: roles read from the computation, checked against explicit roles and nnx_roles."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import agd_optax
from agd_optax import RoleError


def _by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, agd_optax.Role)
    )
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): r for p, r in flat[0]
    }


def _step(params, roles, seed=0):
    """One AGD update of ``params`` for random gradients, and the state."""
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    tx = agd_optax.agd(roles=roles)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return grads, updates, state


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        x = x + h
        h = nn.Dense(16)(nn.LayerNorm()(x))
        return x + nn.Dense(8)(jax.nn.gelu(h)), None


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(20, 8)(ids)
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan()(x, None)
        x = nn.Conv(8, (3,), feature_group_count=8)(x)  # depthwise
        x = nn.BatchNorm(use_running_average=False)(x)
        return nn.Dense(5)(x)


def test_linen_scanned_transformer_with_depthwise_conv_and_batchnorm():
    model = _LinenNet()
    ids = jnp.zeros((2, 6), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)

    def fn(p, stats, ids):
        return model.apply({"params": p, "batch_stats": stats}, ids, mutable=["batch_stats"])

    stats = variables["batch_stats"]
    roles = _by_path(agd_optax.trace_roles(fn, variables["params"], stats, ids))
    blk = "Scan_Block_0"
    attn = f"{blk}/MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        assert roles[f"{attn}/{name}/kernel"] == agd_optax.dense(1, (2, 3), stack_axes=0)
        assert roles[f"{attn}/{name}/bias"] == agd_optax.bias(f"{attn}/{name}/kernel")
    assert roles[f"{attn}/out/kernel"] == agd_optax.dense((1, 2), 3, stack_axes=0)
    assert roles[f"{blk}/Dense_0/kernel"] == agd_optax.dense(1, 2, stack_axes=0)
    assert roles[f"{blk}/LayerNorm_0/scale"] == agd_optax.norm(stack_axes=0)
    assert roles[f"{blk}/LayerNorm_1/bias"] == agd_optax.norm(stack_axes=0)
    assert roles["Conv_0/kernel"] == agd_optax.conv(0, 1, 2, groups=8)
    assert roles["Conv_0/bias"] == agd_optax.bias("Conv_0/kernel")
    assert roles["BatchNorm_0/scale"] == roles["BatchNorm_0/bias"] == agd_optax.norm()
    assert roles["Embed_0/embedding"] == agd_optax.embedding()
    layouts = agd_optax.resolve_layouts(
        variables["params"], agd_optax.trace_roles(fn, variables["params"], stats, ids)
    )
    assert sum(lay.count for lay in layouts) == 3 * 6 + 3  # 6 weights per block; embed, conv, head


def test_pytorch_layout_gets_the_update_of_the_flax_layout():
    rng = np.random.default_rng(1)
    torch = {
        "fc1": {"weight": rng.normal(size=(32, 12)), "bias": np.zeros(32)},
        "fc2": {"weight": rng.normal(size=(5, 32)), "bias": np.zeros(5)},
        "conv": {"weight": rng.normal(size=(12, 3, 3, 3)), "bias": np.zeros(12)},
    }
    torch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), torch)

    def torch_fn(p, x):  # NCHW, like PyTorch.
        y = jax.lax.conv_general_dilated(x, p["conv"]["weight"], (1, 1), "SAME")
        y = y + p["conv"]["bias"][None, :, None, None]
        y = y.mean(axis=(2, 3))
        y = jax.nn.relu(y @ p["fc1"]["weight"].T + p["fc1"]["bias"][None])
        return y @ p["fc2"]["weight"].T + p["fc2"]["bias"][None]

    roles = agd_optax.trace_roles(torch_fn, torch, jnp.zeros((2, 3, 8, 8)))
    flax = {
        "fc1": {"kernel": torch["fc1"]["weight"].T, "bias": torch["fc1"]["bias"]},
        "fc2": {"kernel": torch["fc2"]["weight"].T, "bias": torch["fc2"]["bias"]},
        "conv": {"kernel": torch["conv"]["weight"].transpose(2, 3, 1, 0), "bias": jnp.zeros(12)},
    }
    g_t, u_t, s_t = _step(torch, roles)
    to_flax = {
        "fc1": lambda d: {"kernel": d["weight"].T, "bias": d["bias"]},
        "fc2": lambda d: {"kernel": d["weight"].T, "bias": d["bias"]},
        "conv": lambda d: {"kernel": d["weight"].transpose(2, 3, 1, 0), "bias": d["bias"]},
    }
    grads_flax = {k: f(g_t[k]) for k, f in to_flax.items()}
    tx = agd_optax.agd()
    u_f, s_f = jax.jit(tx.update)(grads_flax, tx.init(flax), flax)
    chex.assert_trees_all_close({k: f(u_t[k]) for k, f in to_flax.items()}, u_f, rtol=1e-6)
    chex.assert_trees_all_close(s_t[0], s_f[0], rtol=1e-6)


def test_a_one_hot_product_is_a_lookup_like_indexing():
    params = {"embed": jnp.zeros((50, 8)), "w": jnp.zeros((8, 4))}
    ids = jnp.zeros((2, 3), jnp.int32)
    forms = {
        "indexing": lambda p, ids: p["embed"][ids] @ p["w"],
        "one_hot": lambda p, ids: jax.nn.one_hot(ids, 50) @ p["embed"] @ p["w"],
        "arange": lambda p, ids: (
            (jnp.arange(50)[None, None] == ids[..., None]).astype(jnp.float32) @ p["embed"] @ p["w"]
        ),
        "einsum": lambda p, ids: (
            jnp.einsum("btv,vd->btd", jax.nn.one_hot(ids, 50), p["embed"]) @ p["w"]
        ),
    }
    for name, fn in forms.items():
        roles = agd_optax.trace_roles(fn, params, ids)
        assert roles["embed"] == agd_optax.embedding(), name
    tied = lambda p, ids: jax.nn.one_hot(ids, 50) @ p["embed"] @ p["w"] @ p["embed"].T
    square = {"embed": params["embed"], "w": jnp.zeros((8, 8))}
    assert agd_optax.trace_roles(tied, square, ids)["embed"] == agd_optax.embedding()
    # A comparison with a constant is a mask, not a one-hot: its product is an ordinary weight.
    masked = lambda p, ids: ((ids == 0)[..., None] * jnp.ones((2, 3, 50))) @ p["embed"] @ p["w"]
    assert agd_optax.trace_roles(masked, params, ids)["embed"] == agd_optax.dense(0, 1)


def test_tied_embedding_is_one_weight_whose_lookup_and_head_agree():
    params = {"embed": jnp.zeros((50, 8)), "w": jnp.zeros((8, 8))}

    def fn(p, ids):
        x = jnp.take(p["embed"], ids, axis=0) @ p["w"]
        return x @ p["embed"].T

    roles = agd_optax.trace_roles(fn, params, jnp.zeros((3,), jnp.int32))
    assert roles["embed"] == agd_optax.embedding()
    head = agd_optax.dense(-1, -2)  # The map x @ embed.T: fan-in the features.
    assert (roles["embed"].in_axes, roles["embed"].out_axes) == (head.in_axes, head.out_axes)
    assert sum(lay.count for lay in agd_optax.resolve_layouts(params, roles)) == 2


def test_stack_axes_from_vmap_fori_loop_and_indexing():
    params = {
        "ensemble": jnp.zeros((4, 6, 3)),  # vmapped over axis 0 with its own inputs
        "loop": jnp.zeros((5, 3, 3)),  # indexed in a fori_loop
        "fused": jnp.zeros((3, 3, 2)),  # three projections, each taken by a static index
    }

    def fn(p, x):
        y = jax.vmap(lambda w, x: x @ w)(p["ensemble"], jnp.stack([x] * 4)).sum(0)
        y = jax.lax.fori_loop(0, 5, lambda i, h: h @ p["loop"][i], y)
        return [y @ p["fused"][k] for k in range(3)]

    roles = agd_optax.trace_roles(fn, params, jnp.zeros((2, 6)))
    assert roles["ensemble"] == agd_optax.dense(1, 2, stack_axes=0)
    assert roles["loop"] == agd_optax.dense(1, 2, stack_axes=0)
    assert roles["fused"] == agd_optax.dense(1, 2, stack_axes=0)


def test_nnx_conv_transpose_and_linear_general_match_nnx_roles():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(4, 6, (3, 3), transpose_kernel=True, rngs=rngs)
            self.up2 = nnx.ConvTranspose(6, 5, (2, 2), rngs=rngs)
            self.proj = nnx.LinearGeneral((5,), (2, 3), axis=(-1,), rngs=rngs)

        def __call__(self, x):
            return self.proj(self.up2(self.up(x)))

    model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    gd, params = nnx.split(model, nnx.Param)
    roles = agd_optax.trace_roles(lambda p, x: nnx.merge(gd, p)(x), params, jnp.zeros((1, 5, 5, 4)))
    assert agd_optax.resolve_layouts(params, roles) == agd_optax.resolve_layouts(
        params, agd_optax.nnx_roles(model)
    )


def test_every_undecidable_leaf_is_listed_in_one_error():
    params = {
        "temperature": jnp.zeros(()),
        "pos": jnp.zeros((6, 8)),
        "w": jnp.zeros((8, 8)),
        "unused": jnp.zeros((3, 3)),
        "kernel": jnp.zeros((8, 4)),
    }

    def fn(p, x):
        h = x @ p["w"] + p["pos"][None]  # a positional table is not a bias of 'w'
        h = h @ p["w"].T  # the same weight with fan-in and fan-out swapped
        return (h @ p["kernel"]) * jnp.exp(p["temperature"])

    with pytest.raises(RoleError) as e:
        agd_optax.trace_roles(fn, params, jnp.zeros((2, 6, 8)))
    msg = str(e.value)
    assert "4 leaves" in msg
    assert "'temperature'" in msg and "'exp'" in msg
    assert "'pos'" in msg and "not that weight's fan-out" in msg
    assert "'w'" in msg and "different ways" in msg
    assert "'unused'" in msg and "does not use it" in msg
    assert "'kernel'" not in msg


def test_shared_weight_used_the_same_way_is_one_weight():
    params = {"w": jnp.zeros((8, 8)), "head": jnp.zeros((8, 2))}
    roles = agd_optax.trace_roles(
        lambda p, x: (x @ p["w"]) @ p["w"] @ p["head"], params, jnp.zeros((1, 8))
    )
    assert roles["w"] == agd_optax.dense(0, 1)


_ARCHS = [
    ("fcn", (6, 6, 1), dict(depth=3, width=8)),
    ("cnn1d", (20, 1), dict(width=4)),
    ("vgg16", (32, 32, 3), dict(width=2)),
    ("resnet18", (8, 8, 3), dict(width=2)),
    ("preact_resnet18", (8, 8, 3), dict(width=2)),
    ("resnet50", (32, 32, 3), dict(width=2)),
]


@pytest.mark.parametrize("arch, shape, kw", _ARCHS, ids=[a[0] for a in _ARCHS])
def test_benchmark_models_trace_like_nnx_roles(arch, shape, kw):
    from benchmarks.models import make_model

    model = nnx.eval_shape(  # Shapes only: nothing is initialised or run.
        lambda: make_model(
            arch, num_classes=3, input_shape=shape, bias=True, rngs=nnx.Rngs(0), **kw
        )
    )
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    fn = lambda p, rest, x: nnx.merge(gd, p, rest)(x)  # noqa: E731
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    roles = agd_optax.trace_roles(fn, params, rest, x)
    traced = agd_optax.resolve_layouts(params, roles)
    assert traced == agd_optax.resolve_layouts(params, agd_optax.nnx_roles(model))
    # Names read the same roles, or refuse (CNN1D: a 3-axis kernel may be a 1-D convolution).
    if arch == "cnn1d":
        with pytest.raises(RoleError, match="convs/0/kernel"):
            agd_optax.resolve_layouts(params)
    else:
        assert agd_optax.resolve_layouts(params) == traced
    assert {lay.kind for lay in traced} == (
        {"weight", "bias"} if arch in ("fcn", "cnn1d") else {"weight", "bias", "norm"}
    )
    np.testing.assert_equal(len(traced), len(jax.tree.leaves(params)))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unstacked", "stacked"])
@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
def test_benchmark_transformer_traces_like_its_explicit_roles(scan_layers, tied):
    from transformer_roles import transformer_roles

    from benchmarks.models.transformer import Transformer

    model = nnx.eval_shape(
        lambda: Transformer(
            13,
            context=6,
            depth=2,
            width=8,
            heads=2,
            bias=True,
            tied=tied,
            scan_layers=scan_layers,
            rngs=nnx.Rngs(0),
        )
    )
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    fn = lambda p, rest, x: nnx.merge(gd, p, rest)(x)  # noqa: E731
    roles = agd_optax.trace_roles(fn, params, rest, jax.ShapeDtypeStruct((1, 6), jnp.int32))
    traced = agd_optax.resolve_layouts(params, roles)
    assert traced == agd_optax.resolve_layouts(params, transformer_roles(model))
    assert traced == agd_optax.resolve_layouts(params, agd_optax.nnx_roles(model))


def test_einsum_fusion_remat_cond_and_casts_are_followed():
    params = {
        "qkv": jnp.zeros((3, 2, 8, 4)),
        "o": jnp.zeros((2, 4, 8)),
        "w": jnp.zeros((8, 8)),
        "b": jnp.zeros(8),
        "c": jnp.zeros((8, 8)),
    }

    def fn(p, x, flag):
        q, k, v = jnp.einsum("btd,sndh->sbtnh", x, p["qkv"].astype(jnp.bfloat16))
        a = jax.nn.dot_product_attention(q, k, v).astype(jnp.float32)
        h = jnp.einsum("btnh,nhd->btd", a, p["o"])
        h = jax.checkpoint(lambda h: h @ p["w"] + p["b"][None, None])(h)
        return jax.lax.cond(flag > 0, lambda h: h @ p["c"], lambda h: -(h @ p["c"]), h)

    roles = agd_optax.trace_roles(fn, params, jnp.zeros((2, 5, 8)), jnp.zeros((), jnp.int32))
    assert roles["qkv"] == agd_optax.dense(2, (0, 1, 3))  # one einsum: one fused weight
    assert roles["o"] == agd_optax.dense((0, 1), 2)
    assert roles["b"] == agd_optax.bias("w")
    assert roles["c"] == agd_optax.dense(0, 1)


def test_traced_roles_reinitialize_a_pytorch_layout_tree():
    params = {"w": jnp.zeros((16, 4)), "b": jnp.ones(16)}
    roles = agd_optax.trace_roles(lambda p, x: p["w"] @ x + p["b"], params, jnp.zeros(4))
    new = agd_optax.reinitialize(jax.random.key(0), params, roles)
    np.testing.assert_allclose(np.linalg.svd(new["w"], compute_uv=False), 2.0, rtol=1e-5)
    np.testing.assert_array_equal(new["b"], params["b"])


def test_a_lookup_of_one_id_is_still_a_lookup():
    params = {"table": jnp.zeros((10, 4)), "w": jnp.zeros((4, 2))}
    roles = agd_optax.trace_roles(
        lambda p, ids: jnp.take(p["table"], ids, axis=0) @ p["w"], params, jnp.zeros((1, 1), int)
    )
    assert roles["table"] == agd_optax.embedding()


def test_stop_gradient_is_followed():
    params = {"frozen": jnp.zeros((3, 4)), "head": jnp.zeros((4, 2))}
    roles = agd_optax.trace_roles(
        lambda p, x: x @ jax.lax.stop_gradient(p["frozen"]) @ p["head"], params, jnp.zeros((1, 3))
    )
    assert roles["frozen"] == agd_optax.dense(0, 1)
