"""agd_momentum(): hand-computed steps, its relation to agd(), and the optax contract (jit, scan,
cond, bf16, MultiSteps, inject_hyperparams, apply_if_finite, sharding on 8 CPU devices)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zoo
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import agd_optax

PROBLEMS = zoo.all_problems()
BY_NAME = {p.name: p for p in PROBLEMS}
CORE = [BY_NAME["mlp_bias_layernorm"], BY_NAME["tiny_cnn"]]


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    """chex.assert_max_traces counts per function definition: start each test from zero."""
    chex.clear_trace_counter()


def _ids(problem):
    return problem.name


@functools.cache
def _setup(name, seed):
    problem = BY_NAME[name]
    params = jax.jit(problem.init)(jax.random.key(seed, impl="rbg"))
    return params, jax.jit(jax.grad(problem.loss))(params)


def _np(x):
    return np.asarray(x, np.float64)


def _avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), jax.typeof(x).weak_type), tree)


def _close(a, b, rtol=1e-6, atol=0.0):
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _eta(state):
    return float(optax.tree.get(state, "eta"))


@jax.jit
def _two_momentum_steps(params, g1, g2):
    tx = agd_optax.agd_momentum()
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    u2, state = tx.update(g2, state, params)
    return u1, u2, state


# --------------------------------------------------------------------------------------------------
# The rule.


def test_two_steps_by_hand():
    """Two dense weights: every number of the rule computed in NumPy, float64."""
    rng = np.random.default_rng(0)
    shapes = {"a": (6, 4), "b": (4, 3)}
    params = {k: {"kernel": rng.standard_normal(s).astype(np.float32)} for k, s in shapes.items()}
    g1, g2 = (
        {k: {"kernel": rng.standard_normal(s).astype(np.float32)} for k, s in shapes.items()}
        for _ in range(2)
    )
    u1, u2, state = _two_momentum_steps(params, g1, g2)

    def step(g, m):
        s = {k: math.sqrt(shape[1] / shape[0]) for k, shape in shapes.items()}
        G = sum(s[k] * np.linalg.norm(_np(g[k]["kernel"])) for k in shapes) / 2
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        u = {
            k: {"kernel": -eta / 2 * s[k] * m[k] / np.linalg.norm(m[k])}  # Descent: negated.
            for k in shapes
        }
        return u, eta, G

    m1 = {k: 0.1 * _np(g1[k]["kernel"]) for k in shapes}
    m2 = {k: 0.9 * m1[k] + 0.1 * _np(g2[k]["kernel"]) for k in shapes}
    ref1, _, _ = step(g1, m1)
    ref2, eta2, G2 = step(g2, m2)
    _close(jax.tree.map(_np, u1), ref1, rtol=1e-5)
    _close(jax.tree.map(_np, u2), ref2, rtol=1e-5)
    np.testing.assert_allclose(_eta(state), eta2, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.get(state, "G")), G2, rtol=1e-6)
    momentum = {k: {"kernel": m2[k]} for k in m2}
    _close(jax.tree.map(_np, optax.tree.get(state, "momentum")), momentum, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_first_update_is_agd_and_second_is_agd_on_the_average(problem):
    """Kernels, conv positions, biases and norm parameters: momentum changes only the direction
    (AGD's rule applied to m), never the step (eta from the gradient)."""
    params, g1 = _setup(problem.name, 0)
    _, g2 = _setup(problem.name, 1)
    u1, u2, state = _two_momentum_steps(params, g1, g2)
    agd = jax.jit(agd_optax.agd().update)
    ref1, _ = agd(g1, agd_optax.agd().init(params), params)
    _close(u1, ref1, rtol=1e-5, atol=1e-7)

    m2 = jax.tree.map(lambda a, b: 0.9 * 0.1 * a + 0.1 * b, g1, g2)
    on_m, m_state = agd(m2, agd_optax.agd().init(params), params)
    _, g_state = agd(g2, agd_optax.agd().init(params), params)
    ratio = _eta(g_state) / _eta(m_state)
    _close(u2, jax.tree.map(lambda u: u * ratio, on_m), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_eta(state), _eta(g_state), rtol=1e-6)


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_converges_in_scan_under_jit(problem):
    tx = agd_optax.agd_momentum()

    @functools.partial(jax.jit, compiler_options=zoo.OPTIMIZED)
    def train(params):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(problem.loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p, s), losses = jax.lax.scan(body, (params, tx.init(params)), length=problem.steps)
        return s, losses, problem.loss(p)

    state, losses, final = train(_setup(problem.name, 0)[0])
    assert np.all(np.isfinite(_np(losses)))
    assert float(final) < problem.target * float(losses[0]), (problem.name, losses[0], final)
    assert int(optax.tree.get(state, "count")) == problem.steps


def test_state_is_one_buffer_the_size_of_the_parameters():
    params, _ = _setup("tiny_cnn", 0)
    params = {**params, "head": {"kernel": params["head"]["kernel"].astype(jnp.bfloat16)}}
    state = agd_optax.agd_momentum().init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(optax.tree.get(state, "momentum"), params)
    arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sum(x.nbytes for x in arrays) == sum(x.nbytes for x in jax.tree.leaves(params))
    assert sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim == 0) == 12


def test_bad_momentum_is_an_error():
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="momentum"):
            agd_optax.agd_momentum(momentum=bad)


# --------------------------------------------------------------------------------------------------
# The optax contract.


@pytest.mark.parametrize(
    "gain", [1.0, optax.linear_schedule(1.0, 0.5, 10)], ids=["float_gain", "schedule_gain"]
)
def test_no_recompilation_on_second_call(gain):
    tx = agd_optax.agd_momentum(gain)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, g1 = _setup("mlp_bias_layernorm", 0)
    _, g2 = _setup("mlp_bias_layernorm", 1)
    state = tx.init(params)
    p1, s1 = step(params, state, g1)
    p2, s2 = step(p1, s1, g2)
    assert step._cache_size() == 1
    assert _avals(s1) == _avals(state) == _avals(s2)
    assert int(s2[0].count) == 2


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_bfloat16_params_and_grads(problem):
    params, grads = _setup(problem.name, 0)
    bf = lambda t: jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), t)  # noqa: E731
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    tx = agd_optax.agd_momentum()

    @jax.jit
    def run(params, grads):
        state = tx.init(params)
        u1, state = tx.update(grads, state, params)
        u2, state = tx.update(jax.tree.map(lambda g: -0.5 * g, grads), state, params)
        return u2, state

    u, state = run(bf(params), bf(grads))
    ref_u, ref_state = run(f32(bf(params)), f32(bf(grads)))
    assert jax.tree.map(jnp.result_type, u) == jax.tree.map(jnp.result_type, bf(grads))
    chex.assert_type([state[0].eta, state[0].G], jnp.float32)
    chex.assert_trees_all_equal_shapes_and_dtypes(state[0].momentum, bf(params))
    np.testing.assert_allclose(_eta(state), _eta(ref_state), rtol=1e-6)
    # The average is held in bfloat16 (rounded once per step): a few bf16 ulps of the f32 update.
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):
        np.testing.assert_allclose(_np(a), _np(b), rtol=2.0**-6, atol=1e-3 * np.abs(_np(b)).max())


def test_state_stable_under_cond():
    params, grads = _setup("mlp_bias_layernorm", 0)
    tx = agd_optax.agd_momentum()
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(pred, state):
        return jax.lax.cond(
            pred,
            lambda s: tx.update(grads, s, params),
            lambda s: (jax.tree.map(jnp.zeros_like, grads), s),
            state,
        )

    for pred in (True, False):
        _, new_state = step(pred, state)
        assert _avals(new_state) == _avals(state)
        assert int(optax.tree.get(new_state, "count")) == int(pred)
    assert step._cache_size() == 1


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_multisteps_equals_update_on_mean_gradient(problem):
    params, _ = _setup(problem.name, 0)
    gs = [_setup(problem.name, seed)[1] for seed in (1, 2, 3)]
    tx = optax.MultiSteps(agd_optax.agd_momentum(), every_k_schedule=3)
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    for g in gs:
        updates, state = step(g, state, params)
    mean = jax.tree.map(lambda *g: sum(np.asarray(x) for x in g) / np.float32(3), *gs)
    plain = agd_optax.agd_momentum()
    ref_updates, ref_state = jax.jit(plain.update)(mean, plain.init(params), params)
    _close(updates, ref_updates, rtol=1e-5, atol=1e-7)
    _close(state.inner_opt_state, ref_state, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_gain_and_momentum():
    params, grads = _setup("mlp_bias_layernorm", 0)
    injected = optax.inject_hyperparams(agd_optax.agd_momentum)(gain=2.0, momentum=0.9)
    plain = agd_optax.agd_momentum(2.0)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s_inj, s_ref, grads):
        u_inj, s_inj = injected.update(grads, s_inj, params)
        u_ref, s_ref = plain.update(grads, s_ref, params)
        return u_inj, s_inj, u_ref, s_ref

    s_inj, s_ref = injected.init(params), plain.init(params)
    for g in (grads, jax.tree.map(lambda x: x * x - 0.1, grads)):
        u_inj, s_inj, u_ref, s_ref = step(s_inj, s_ref, g)
        _close(u_inj, u_ref, rtol=1e-6, atol=1e-8)
    s_inj.hyperparams["gain"] = jnp.asarray(0.5, s_inj.hyperparams["gain"].dtype)
    u_half, _, u_ref, _ = step(s_inj, s_ref, grads)
    _close(u_half, jax.tree.map(lambda u: 0.25 * u, u_ref), rtol=1e-6, atol=1e-8)
    assert step._cache_size() == 1


def test_nonfinite_gradient_poisons_the_step_and_apply_if_finite_skips_it():
    params, grads = _setup("mlp_bias_layernorm", 0)
    leaves, treedef = jax.tree.flatten(grads)
    bad = [np.array(x) for x in leaves]
    bad[-1].reshape(-1)[0] = np.nan  # The last leaf: a LayerNorm parameter or a bias.
    bad = jax.tree.unflatten(treedef, bad)
    tx = agd_optax.agd_momentum()
    updates, state = jax.jit(tx.update)(bad, tx.init(params), params)
    assert math.isnan(_eta(state))
    assert all(np.all(np.isnan(_np(u))) for u in jax.tree.leaves(updates))

    safe = optax.apply_if_finite(agd_optax.agd_momentum(), max_consecutive_errors=2)
    step = jax.jit(safe.update)
    _, s1 = step(grads, safe.init(params), params)
    updates, s2 = step(bad, s1, params)
    assert all(np.all(_np(u) == 0.0) for u in jax.tree.leaves(updates))
    _close(s2.inner_state, s1.inner_state)


def test_zero_gradient_gives_zero_update():
    params, _ = _setup("tiny_cnn", 0)
    zeros = jax.tree.map(np.zeros_like, params)
    tx = agd_optax.agd_momentum()
    updates, state = jax.jit(tx.update)(zeros, tx.init(params), params)
    assert all(np.all(_np(u) == 0.0) for u in jax.tree.leaves(updates))
    assert _eta(state) == 0.0


# --------------------------------------------------------------------------------------------------
# Sharding on 8 CPU devices: jit over sharded arrays, and shard_map on parameter shards.

_SHAPES = {
    "conv": {"kernel": (3, 3, 8, 16), "bias": (16,)},
    "dense0": {"kernel": (16, 32), "bias": (32,)},
    "norm0": {"scale": (32,), "bias": (32,)},
    "dense1": {"kernel": (32, 8)},
}
_SPECS = {
    "conv": {"kernel": P(None, None, None, "data"), "bias": P("data")},
    "dense0": {"kernel": P("data", None), "bias": P("data")},
    "norm0": {"scale": P("data"), "bias": P()},
    "dense1": {"kernel": P("data", None)},
}


@functools.cache
def _sharding_problem():
    rng = np.random.default_rng(3)
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    make = lambda s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    params = jax.tree.map(make, _SHAPES, is_leaf=is_shape)
    g1 = jax.tree.map(make, _SHAPES, is_leaf=is_shape)
    g2 = jax.tree.map(make, _SHAPES, is_leaf=is_shape)
    return params, g1, g2


def _two_steps(tx, params, g1, g2):
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    u2, state = tx.update(g2, state, optax.apply_updates(params, u1))
    return u2, state


def test_sharded_jit_and_shard_map_match_unsharded():
    assert jax.device_count() == 8
    params, g1, g2 = _sharding_problem()
    ref_u, ref_state = jax.jit(functools.partial(_two_steps, agd_optax.agd_momentum()))(
        params, g1, g2
    )
    mesh = jax.make_mesh((8,), ("data",))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _SPECS)
    sh = [jax.device_put(t, shardings) for t in (params, g1, g2)]
    with jax.set_mesh(mesh):
        u, state = jax.jit(functools.partial(_two_steps, agd_optax.agd_momentum()))(*sh)
    _close(u, ref_u, rtol=1e-5, atol=1e-7)
    _close(state, ref_state, rtol=1e-5, atol=1e-7)
    for x, sharding in zip(jax.tree.leaves(u), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(sharding, x.ndim)

    # shard_map on parameter shards: param_specs completes every norm with a psum.
    tx = agd_optax.agd_momentum(param_specs=_SPECS)
    # The chain's state: AGD with momentum's, then the (empty) state of the gain.
    state_specs = (agd_optax.AGDMomentumState(count=P(), eta=P(), G=P(), momentum=_SPECS), P())
    inner, gain_state = agd_optax.agd_momentum().init(params)
    state0 = (inner._replace(momentum=jax.device_put(inner.momentum, shardings)), gain_state)

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(_SPECS, state_specs, _SPECS, _SPECS),
        out_specs=(_SPECS, state_specs),
    )
    def sharded(params, state, g1, g2):
        u1, state = tx.update(g1, state, params)
        return tx.update(g2, state, optax.apply_updates(params, u1))

    u, state = sharded(sh[0], state0, sh[1], sh[2])
    _close(u, ref_u, rtol=1e-5, atol=1e-7)
    _close(state, ref_state, rtol=1e-5, atol=1e-7)
