"""Tests of the transformer language model (benchmarks.models.transformer), at tiny sizes."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformer_roles import transformer_roles

import agd_optax
from benchmarks.models.transformer import (
    Transformer,
    generate,
    load_params,
    stack_blocks,
    unstack_blocks,
)

VOCAB = 11
SIZES = dict(context=8, depth=2, width=16, heads=2)


@functools.cache
def _abstract(kw):
    return nnx.eval_shape(lambda: Transformer(VOCAB, **SIZES, **dict(kw), rngs=nnx.Rngs(0)))


def make(seed=0, **kw):
    """A model with random parameters from NumPy: building it with its real initialisers compiles
    each of them eagerly, which takes seconds (tests of the initialisers build that way)."""
    graphdef, state = nnx.split(_abstract(tuple(sorted(kw.items()))))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(path[-2].key if hasattr(path[-2], "key") else path[-2])
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        std = 0.1 if name == "bias" else 0.25
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def build(**kw):
    return Transformer(VOCAB, **{**SIZES, **kw}, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, x):
    return model(x)


def tokens(shape=(3, 8), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def flat_params(model):
    return {
        "/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def twins(bias=False, tied=False):
    """An unstacked model and a scan_layers model holding the same parameters."""
    flat = make(bias=bias, tied=tied)
    scanned = make(bias=bias, tied=tied, scan_layers=True)
    load_params(scanned, stack_blocks(nnx.state(flat, nnx.Param), SIZES["depth"]))
    return flat, scanned


def test_shapes_and_parameter_layout():
    model = make(bias=True, tied=True)
    assert forward(model, tokens()).shape == (3, 8, VOCAB)
    params = flat_params(model)
    assert params["token_embed/embedding"].shape == (VOCAB, 16)
    assert params["pos_embed/embedding"].shape == (8, 16)
    assert params["blocks/1/attn/query/kernel"].shape == (16, 2, 8)
    assert params["blocks/1/attn/out/kernel"].shape == (2, 8, 16)
    assert params["blocks/0/fc1/kernel"].shape == (16, 64)
    assert params["blocks/0/ln1/scale"].shape == (16,)
    assert "blocks/0/fc1/bias" in params and "ln_f/bias" in params
    assert not any(k.startswith("head") for k in params)  # Tied.


def test_no_bias_model_has_only_weights():
    params = flat_params(make())
    assert all(k.endswith(("kernel", "embedding")) for k in params)
    assert params["head/kernel"].shape == (16, VOCAB)


def test_causal_and_shorter_sequences():
    model = make()
    x = tokens()
    y = x.at[:, 5:].set((x[:, 5:] + 1) % VOCAB)
    out_x, out_y = forward(model, x), forward(model, y)
    chex.assert_trees_all_close(out_x[:, :5], out_y[:, :5], atol=1e-6)
    assert not np.allclose(out_x[:, 5:], out_y[:, 5:])
    chex.assert_trees_all_close(forward(model, x[:, :4]), out_x[:, :4], atol=1e-5)


def test_tied_head_is_the_embedding_transposed():
    model = make(bias=True, tied=True)
    x = tokens()
    features = model.ln_f(
        model.blocks[1](
            model.blocks[0](
                model.token_embed(x) + model.pos_embed(jnp.arange(8))[None],
                nnx.make_causal_mask(jnp.ones((1, 8))),
            ),
            nnx.make_causal_mask(jnp.ones((1, 8))),
        )
    )
    expected = features @ model.token_embed.embedding[...].T
    chex.assert_trees_all_close(forward(model, x), expected, atol=1e-5)


def test_agd_init_gives_every_weight_its_scaled_orthogonal_spectrum():
    params = flat_params(build())
    for name, matrix in [
        ("token_embed/embedding", params["token_embed/embedding"]),
        ("pos_embed/embedding", params["pos_embed/embedding"]),
        ("fc1", params["blocks/0/fc1/kernel"]),
        ("fc2", params["blocks/1/fc2/kernel"]),
        ("query", params["blocks/0/attn/query/kernel"].reshape(16, 16)),
        ("out", params["blocks/0/attn/out/kernel"].reshape(16, 16)),
        ("head", params["head/kernel"]),
    ]:
        d_in, d_out = matrix.shape
        if name.endswith("embedding"):  # A table is the map features -> rows.
            d_in, d_out = d_out, d_in
        s = np.linalg.svd(np.asarray(matrix), compute_uv=False)
        np.testing.assert_allclose(s, math.sqrt(d_out / d_in), rtol=1e-4, err_msg=name)


def test_gpt2_init_and_bad_arguments():
    params = flat_params(build(init="gpt2"))
    assert abs(float(jnp.std(params["blocks/0/fc1/kernel"])) - 0.02) < 0.004
    assert float(jnp.std(params["blocks/0/fc2/kernel"])) < 0.015  # Residual output: / sqrt(4).
    with pytest.raises(ValueError, match="init"):
        build(init="xavier")
    with pytest.raises(ValueError, match="does not divide"):
        build(heads=3)
    with pytest.raises(ValueError, match="depth"):
        build(depth=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        make()(tokens((1, 9)))
    with pytest.raises(ValueError, match="batch, length"):
        make()(jnp.zeros((8,), jnp.int32))


@pytest.mark.parametrize("bias,tied", [(False, False), (True, True)])
def test_stacked_and_unstacked_give_the_same_logits(bias, tied):
    flat, scanned = twins(bias=bias, tied=tied)
    x = tokens()
    chex.assert_trees_all_close(forward(scanned, x), forward(flat, x), atol=1e-5)
    back = make(seed=2, bias=bias, tied=tied)
    load_params(back, unstack_blocks(nnx.state(scanned, nnx.Param), SIZES["depth"]))
    chex.assert_trees_all_close(flat_params(back), flat_params(flat))


def test_load_params_names_a_mismatch():
    model = make()
    params = stack_blocks(nnx.state(model, nnx.Param), SIZES["depth"])
    with pytest.raises(ValueError, match="missing"):
        load_params(model, params)
    other = stack_blocks(nnx.state(make(), nnx.Param), SIZES["depth"])
    other[("head", "kernel")] = jnp.zeros((4, 4))
    with pytest.raises(ValueError, match="head/kernel"):
        load_params(make(scan_layers=True), other)


def test_roles_match_the_layers_and_stack_axes():
    flat, scanned = twins(bias=True)
    for model in (flat, scanned):
        layouts = agd_optax.resolve_layouts(nnx.state(model, nnx.Param), transformer_roles(model))
        by_path = {lay.path: lay for lay in layouts}
        # Depth: 2 embeddings + head + 2 blocks x (q, k, v, out, fc1, fc2).
        assert sum(lay.count for lay in layouts) == 15
        prefix = "blocks" if model.scan_layers else "blocks/0"
        query = by_path[f"{prefix}/attn/query/kernel"]
        assert query.scale == pytest.approx(1.0)
        assert query.stack_axes == ((0,) if model.scan_layers else ())
        assert by_path[f"{prefix}/fc1/kernel"].scale == pytest.approx(2.0)
        assert by_path[f"{prefix}/attn/query/bias"].kind == "bias"
        assert by_path[f"{prefix}/ln1/scale"].kind == "norm"
        assert by_path[f"{prefix}/ln1/scale"].stack_axes == query.stack_axes
        assert by_path["token_embed/embedding"].scale == pytest.approx(math.sqrt(VOCAB / 16))


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_roles_are_those_trace_roles_reads(scan_layers, tied):
    model = make(bias=True, tied=tied, scan_layers=scan_layers)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traced = agd_optax.trace_roles(
        lambda p, r, x: nnx.merge(graphdef, p, r)(x), params, rest, tokens()
    )
    assert agd_optax.resolve_layouts(params, traced) == agd_optax.resolve_layouts(
        params, transformer_roles(model)
    )


def agd_losses(model, steps=6):
    """Next-token cross-entropy over ``steps`` AGD steps on a fixed batch."""
    optimizer = nnx.Optimizer(model, agd_optax.agd(roles=transformer_roles(model)), wrt=nnx.Param)
    x = tokens((4, 9), seed=3)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(x[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return jnp.stack([step(model, optimizer) for _ in range(steps)])


@pytest.mark.slow  # tests/test_train_lm.py checks the same curves through the training program.
def test_stacked_and_unstacked_give_the_same_agd_loss_curve():
    flat, scanned = twins(bias=True, tied=True)  # Biases, norms and a tied head included.
    curve = agd_losses(flat)
    assert float(curve[-1]) < float(curve[0])
    chex.assert_trees_all_close(agd_losses(scanned), curve, rtol=1e-5)
    # And the same parameters afterwards.
    after = {tuple(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(flat, nnx.Param))}
    unstacked = unstack_blocks(nnx.state(scanned, nnx.Param), SIZES["depth"])
    chex.assert_trees_all_close(unstacked, after, rtol=1e-5, atol=1e-6)


def test_generate_samples_within_the_vocabulary():
    model = make()
    key = jax.random.key(0)
    out = generate(model, jnp.array([1, 2, 3]), 12, key)  # Runs past the context of 8.
    assert out.shape == (12,) and out.dtype == jnp.int32
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    chex.assert_trees_all_equal(out, generate(model, jnp.array([1, 2, 3]), 12, key))
    greedy = generate(model, jnp.array([4]), 1, key, temperature=0.0)
    assert int(greedy[0]) == int(jnp.argmax(forward(model, jnp.array([[4]]))[0, -1]))
    with pytest.raises(ValueError, match="prompt"):
        generate(model, jnp.zeros((0,), jnp.int32), 3, key)
