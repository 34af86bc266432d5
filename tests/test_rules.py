"""AGD's alternative rules for 1-D parameters, embeddings and tied tables (benchmarks.rules)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import agd_optax
from benchmarks import rules
from benchmarks.config import Config
from benchmarks.models.transformer import make_transformer

SIZES = dict(context=8, depth=1, width=16, heads=2, bias=True)


@functools.cache
def _model(tied):
    return make_transformer(11, **SIZES, tied=tied, init="gpt2", rngs=nnx.Rngs(0))


def model(tied=False):
    return nnx.clone(_model(tied))


def roles_of(m):
    """The library's roles of a transformer, as the training program reads them."""
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    forward = lambda p, r, x: nnx.merge(graphdef, p, r)(x)  # noqa: E731
    return agd_optax.trace_roles(forward, params, rest, jnp.zeros((1, 8), jnp.int32))


def updates(rule, tied=False):
    m = model(tied)
    tx = rules.agd_transformation(rule, 1.0, roles_of(m))
    params = nnx.state(m, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(out)}


def test_one_d_rules_move_the_weights_as_agd_does_and_the_one_d_leaves_their_own_way():
    default, lr_free, frozen = (updates(r) for r in ("library", "1d_lr_free", "1d_frozen"))
    for name in ("blocks/0/fc1/kernel", "token_embed/embedding", "head/kernel"):
        # Biases and norm parameters are outside L and G, so the weights' steps are unchanged.
        np.testing.assert_allclose(lr_free[name], default[name], rtol=1e-6)
        np.testing.assert_allclose(frozen[name], default[name], rtol=1e-6)
    for name in ("blocks/0/ln1/scale", "blocks/0/fc1/bias", "ln_f/bias"):
        assert np.all(frozen[name] == 0)
        assert np.all(lr_free[name] != 0) and not np.allclose(lr_free[name], default[name])


def test_the_vocabulary_fan_in_rule_changes_only_the_tables_roles():
    roles = lambda rule, tied=False: agd_optax.resolve_layouts(  # noqa: E731
        nnx.state(model(tied), nnx.Param), rules.rule_roles(rule, roles_of(model(tied)))
    )
    by_path = lambda layouts: {lay.path: lay for lay in layouts}  # noqa: E731
    for tied in (False, True):
        default = by_path(roles("library", tied))
        fan_in_vocab = by_path(roles("embedding_fan_in_vocab", tied))
        for table, rows in (("token_embed/embedding", 11), ("pos_embed/embedding", 8)):
            assert default[table].scale == pytest.approx((rows / 16) ** 0.5)
            assert fan_in_vocab[table].scale == pytest.approx((16 / rows) ** 0.5)
        changed = {p for p in default if default[p] != fan_in_vocab[p]}
        assert changed == {"token_embed/embedding", "pos_embed/embedding"}


def test_a_changed_role_reinitialises_that_weight_alone():
    m = model()
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    params = nnx.state(m, nnx.Param)
    new = rules.reinitialize_for_rule(
        "embedding_fan_in_vocab", params, jax.random.key(1), roles_of(m)
    )
    after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(new)}
    changed = {"/".join(map(str, k)) for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"token_embed/embedding", "pos_embed/embedding"}
    s = np.linalg.svd(after[("token_embed", "embedding")], compute_uv=False)
    np.testing.assert_allclose(s, (16 / 11) ** 0.5, rtol=1e-4)


def test_rules_that_do_not_fit_the_model_are_errors():
    with pytest.raises(ValueError, match="unknown AGD rule"):
        rules.rule_roles("diagonal", roles_of(model()))
    with pytest.raises(ValueError, match="embedding tables"):
        linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        rules.rule_roles("embedding_fan_in_vocab", agd_optax.nnx_roles(linear)(nnx.state(linear)))
    with pytest.raises(ValueError, match="agd_rule"):
        Config(agd_rule="diagonal").validate()
    with pytest.raises(ValueError, match="optimizer 'agd' only"):
        Config(optimizer="adam", agd_rule="1d_frozen").validate()


def test_the_program_default_hands_one_d_leaves_to_prodigy_and_is_agd_without_them():
    assert Config().agd_rule == rules.DEFAULT_RULE == "1d_lr_free"
    Config(optimizer="adam").validate()  # The default rule does not stop other optimizers.
    no_bias = make_transformer(11, **(SIZES | dict(bias=False)), init="gpt2", rngs=nnx.Rngs(0))
    params = nnx.state(no_bias, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    outs = []
    for rule in ("library", "1d_lr_free", "1d_frozen"):
        tx = rules.agd_transformation(rule, 1.0, roles_of(no_bias))
        outs.append(jax.jit(tx.update)(grads, tx.init(params), params)[0])
    chex.assert_trees_all_close(outs[1], outs[0])
    chex.assert_trees_all_close(outs[2], outs[0])
