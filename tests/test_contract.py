"""The optax contract of ``agd_optax.agd()``: jit, scan, cond, optax wrappers, mixed precision,
Flax NNX and Linen, sharding, and degenerate gradients, on the zoo's models. (What optax asks of
every optimizer, MultiSteps and jit equal to no jit among it, runs for all of the library's in
``test_optax_contract.py``.)

Setup runs inside ``jax.jit`` (one compilation instead of one per eager op) and checks run in
NumPy, so the whole file stays fast on a small CPU.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zoo
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import agd_optax

PROBLEMS = zoo.all_problems()
BY_NAME = {p.name: p for p in PROBLEMS}
# Dense kernels, biases, LayerNorm scales and offsets; and convolutions.
CORE = [BY_NAME["mlp_bias_layernorm"], BY_NAME["tiny_cnn"]]


@pytest.fixture(autouse=True)
def _fresh_trace_counts():
    """chex.assert_max_traces counts per function definition: start each test from zero."""
    chex.clear_trace_counter()


def _ids(problem):
    return problem.name


def _loss(problem):
    return problem.loss


def _key(seed):
    """An "rbg" PRNG key: its random bits compile in a fraction of threefry's time on CPU."""
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _jitted(name):
    problem = BY_NAME[name]
    return jax.jit(problem.init), jax.jit(jax.grad(_loss(problem)))


@functools.cache
def _init(name, seed):
    return _jitted(name)[0](_key(seed))


@functools.cache
def _setup(name, seed):
    params = _init(name, seed)
    return params, _jitted(name)[1](params)


def _params_and_grads(problem, seed=0):
    """(params, grads) of a zoo problem at its AGD initialisation, computed once."""
    return _setup(problem.name, seed)


def _np(x):
    return np.asarray(x, np.float64)


def _cast(tree, dtype):
    """Casts in NumPy (ml_dtypes gives it bfloat16): no compilation per leaf shape and dtype."""
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)


@jax.jit
def _agd_update(grads, state, params):
    """agd().update, jitted once per tree of shapes for all the tests that share it."""
    return agd_optax.agd().update(grads, state, params)


def _assert_trees_close(a, b, rtol=1e-6, atol=0.0):
    """Same structure, shapes and dtypes, and values within rtol/atol (chex)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_equal(a, b)


def _avals(tree):
    """Shape, dtype and weak type of every leaf: what scan, cond and the jit cache see."""
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), jax.typeof(x).weak_type), tree)


def _dtypes(tree):
    return jax.tree.map(jnp.result_type, tree)


def _all_finite(tree):
    return all(np.all(np.isfinite(_np(x))) for x in jax.tree.leaves(tree))


def _eta(state):
    return float(optax.tree.get(state, "eta"))


def _G(state):
    return float(optax.tree.get(state, "G"))


def _max_abs(tree):
    return max(float(np.max(np.abs(_np(x)))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------------
# 1. Convergence inside lax.scan under jit.


@pytest.mark.parametrize("problem", PROBLEMS, ids=_ids)
def test_converges_in_scan_under_jit(problem):
    tx = agd_optax.agd()
    loss_fn = _loss(problem)

    @functools.partial(jax.jit, compiler_options=zoo.OPTIMIZED)
    def train(params):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p, s), losses = jax.lax.scan(body, (params, tx.init(params)), length=problem.steps)
        return s, losses, loss_fn(p)

    state, losses, final = train(_init(problem.name, 0))
    losses, final = _np(losses), float(final)
    initial = float(losses[0])
    assert np.all(np.isfinite(losses)) and math.isfinite(final)
    assert final < problem.target * initial, (problem.name, initial, final)
    eta = _eta(state)
    assert math.isfinite(eta) and eta >= 0.0
    assert int(optax.tree.get(state, "count")) == problem.steps


# --------------------------------------------------------------------------------------------------
# 2. No recompilation.


@pytest.mark.parametrize(
    "gain", [1.0, optax.linear_schedule(1.0, 0.5, 10)], ids=["float_gain", "schedule_gain"]
)
def test_no_recompilation_on_second_call(gain):
    problem = BY_NAME["mlp_bias_layernorm"]
    tx = agd_optax.agd(gain)

    @jax.jit
    @chex.assert_max_traces(n=1)  # A second trace fails the call that causes it.
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, g1 = _params_and_grads(problem, seed=0)
    _, g2 = _params_and_grads(problem, seed=1)
    state = tx.init(params)
    p1, s1 = step(params, state, g1)
    p2, s2 = step(p1, s1, g2)  # Its own outputs fed back: their avals must be init's.
    assert step._cache_size() == 1
    assert _avals(s1) == _avals(state) == _avals(s2)
    assert _eta(s1) != _eta(s2)  # Really different values went through.
    assert int(s2[0].count) == 2


# --------------------------------------------------------------------------------------------------
# 3. bfloat16 and mixed-precision trees.


def _check_precision(params, grads):
    """AGD on (params, grads) in their own dtypes against AGD on float32 copies of them."""
    tx = agd_optax.agd()
    state = tx.init(params)
    chex.assert_shape([state[0].count, state[0].eta, state[0].G], ())
    chex.assert_type(
        [state[0].count, state[0].eta, state[0].G], [jnp.int32, jnp.float32, jnp.float32]
    )

    @jax.jit
    def step(params, state, grads):
        updates, new_state = tx.update(grads, state, params)
        # The reference: the same values in float32 (bf16 values are exact in f32).
        params32, grads32 = _cast32(params), _cast32(grads)
        ref_updates, ref_state = tx.update(grads32, tx.init(params32), params32)
        return updates, optax.apply_updates(params, updates), new_state, ref_updates, ref_state

    updates, new_params, new_state, ref_updates, ref_state = step(params, state, grads)
    assert _dtypes(updates) == _dtypes(grads)
    assert _dtypes(new_params) == _dtypes(params)
    assert _avals(new_state) == _avals(state)
    chex.assert_type([new_state[0].eta, new_state[0].G], jnp.float32)

    # Norms accumulate in f32: eta from bf16 grads is the eta from the same grads in f32.
    np.testing.assert_allclose(_np(new_state[0].eta), _np(ref_state[0].eta), rtol=1e-6)
    np.testing.assert_allclose(_np(new_state[0].G), _np(ref_state[0].G), rtol=1e-6)
    # Each update is the f32 update rounded once to its leaf's dtype.
    for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
        rtol = 2.0**-8 if u.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(_np(u), _np(r), rtol=rtol, atol=1e-30)


def _cast32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_bfloat16_params_and_grads(problem):
    params, grads = _params_and_grads(problem)
    _check_precision(_cast(params, jnp.bfloat16), _cast(grads, jnp.bfloat16))


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_mixed_bfloat16_float32_tree(problem):
    params, grads = _params_and_grads(problem)
    treedef = jax.tree.structure(params)
    # Alternate leaf by leaf, so that weights, biases and norm parameters get both dtypes.
    dtypes = [jnp.bfloat16 if i % 2 == 0 else jnp.float32 for i in range(treedef.num_leaves)]

    def mix(tree):
        return jax.tree.unflatten(
            treedef, [x.astype(d) for x, d in zip(jax.tree.leaves(tree), dtypes)]
        )

    params, grads = mix(params), mix(grads)
    assert set(jax.tree.leaves(_dtypes(params))) == {
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float32),
    }
    _check_precision(params, grads)


# --------------------------------------------------------------------------------------------------
# 4. State structure and dtypes stable under lax.cond.


@pytest.mark.parametrize(
    ("dtype", "x64"),
    [("float32", False), ("bfloat16", False), ("float32", True), ("float64", True)],
    ids=["float32", "bfloat16", "float32-x64", "float64-x64"],
)
def test_state_stable_under_cond(dtype, x64):
    params, grads = _params_and_grads(BY_NAME["mlp_bias_layernorm"])
    with jax.enable_x64(x64):
        params, grads = _cast(params, dtype), _cast(grads, dtype)
        tx = agd_optax.agd()
        state = tx.init(params)
        acc = jnp.float64 if dtype == "float64" else jnp.float32
        assert state[0].eta.dtype == acc and state[0].G.dtype == acc
        assert state[0].count.dtype == jnp.int32
        assert _avals(jax.eval_shape(tx.update, grads, state, params)[1]) == _avals(state)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(pred, state):
            def do(s):
                return tx.update(grads, s, params)

            def skip(s):
                return jax.tree.map(jnp.zeros_like, grads), s

            return jax.lax.cond(pred, do, skip, state)

        for pred in (True, False):
            updates, new_state = step(pred, state)
            assert jax.tree.structure(new_state) == jax.tree.structure(state)
            assert _avals(new_state) == _avals(state)
            assert _dtypes(new_state) == _dtypes(state)
            assert _dtypes(updates) == _dtypes(grads)
            assert int(optax.tree.get(new_state, "count")) == int(pred)
            if pred:
                assert _eta(new_state) > 0.0
            else:
                _assert_trees_equal(new_state, state)
        assert step._cache_size() == 1


# --------------------------------------------------------------------------------------------------
# 5. inject_hyperparams.


def test_inject_hyperparams_gain():
    problem = BY_NAME["mlp_bias_layernorm"]
    injected = optax.inject_hyperparams(agd_optax.agd)(gain=2.0)
    plain = agd_optax.agd(gain=2.0)

    @jax.jit
    @chex.assert_max_traces(n=1)  # The gain is state: changing it must not retrace.
    def step(params, s_inj, s_ref):
        grads = jax.grad(_loss(problem))(params)
        u_inj, s_inj = injected.update(grads, s_inj, params)
        u_ref, s_ref = plain.update(grads, s_ref, params)
        return u_inj, s_inj, u_ref, s_ref, optax.apply_updates(params, u_ref)

    params = _params_and_grads(problem)[0]
    s_inj, s_ref = injected.init(params), plain.init(params)
    assert float(s_inj.hyperparams["gain"]) == 2.0
    etas = []
    for _ in range(4):
        u_inj, s_inj, u_ref, s_ref, new_params = step(params, s_inj, s_ref)
        _assert_trees_close(u_inj, u_ref, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(_eta(s_inj), _eta(s_ref), rtol=1e-6)
        etas.append(_eta(s_ref))
        params = new_params
    assert len(set(etas)) == 4 and min(etas) > 0.0  # Four different steps.

    # Changing the gain mid-run scales the step by exactly that factor; eta is before the gain.
    s_inj.hyperparams["gain"] = jnp.asarray(0.5, s_inj.hyperparams["gain"].dtype)
    u_half, s_half, u_ref, s_ref, _ = step(params, s_inj, s_ref)
    _assert_trees_close(u_half, jax.tree.map(lambda u: 0.25 * u, u_ref), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(_eta(s_half), _eta(s_ref), rtol=1e-6)
    assert float(s_half.hyperparams["gain"]) == 0.5
    assert int(s_half.count) == 5
    assert step._cache_size() == 1


# --------------------------------------------------------------------------------------------------
# 6. apply_if_finite, and non-finite gradients without it.


def _poison(grads, index, value):
    """grads with the first entry of leaf `index` (flattening order) set to value."""
    leaves, treedef = jax.tree.flatten(grads)
    x = np.array(leaves[index])  # A NumPy copy: no compilation per leaf shape.
    x.reshape(-1)[0] = value
    leaves[index] = x
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_apply_if_finite_skips_nan_step(problem):
    tx = optax.apply_if_finite(agd_optax.agd(), max_consecutive_errors=2)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, grads = _params_and_grads(problem)
    state = tx.init(params)
    params, state = step(params, state, grads)
    eta_before = _eta(state.inner_state)
    assert bool(state.last_finite) and int(state.total_notfinite) == 0

    n_leaves = len(jax.tree.leaves(params))
    for i in (1, 2):  # A NaN in the first leaf, then in the last (kernels, biases, norms).
        bad = _poison(_params_and_grads(problem, 1)[1], 0 if i == 1 else n_leaves - 1, jnp.nan)
        new_params, state = step(params, state, bad)
        _assert_trees_equal(new_params, params)
        assert not bool(state.last_finite)
        assert int(state.notfinite_count) == i and int(state.total_notfinite) == i
        assert _eta(state.inner_state) == eta_before
        assert int(optax.tree.get(state.inner_state, "count")) == 1

    new_params, state = step(params, state, _params_and_grads(problem, 2)[1])
    assert _all_finite(new_params) and bool(state.last_finite)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 2
    assert int(optax.tree.get(state.inner_state, "count")) == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_plain_agd_nonfinite_gradient_poisons_everything(problem, value):
    """Documented in scale_by_agd: "A NaN or Inf in any gradient makes G, eta and every update
    NaN" (so that a step without apply_if_finite cannot go half-wrong unnoticed). Checked with the
    non-finite entry in each leaf in turn: weights, biases and norm-layer parameters."""
    params, grads = _params_and_grads(problem)
    state = agd_optax.agd().init(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    wrong = []
    for i, path in enumerate(paths):
        updates, new_state = _agd_update(_poison(grads, i, value), state, params)
        finite = sum(int(np.sum(np.isfinite(_np(u)))) for u in jax.tree.leaves(updates))
        if not (math.isnan(_eta(new_state)) and math.isnan(_G(new_state)) and finite == 0):
            wrong.append(
                f"{value} in {path}: eta={_eta(new_state)} G={_G(new_state)}, "
                f"{finite} finite update entries"
            )
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------------
# 7. Chained after clip_by_global_norm.


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_chain_after_clip_by_global_norm(problem):
    params, grads = _params_and_grads(problem)
    grads = jax.tree.map(lambda g: 50.0 * np.asarray(g), grads)  # Make sure the clip triggers.
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
    assert norm > 1.0
    clipped = jax.tree.map(lambda g: (g / norm).astype(np.float32), grads)

    tx = optax.chain(optax.clip_by_global_norm(1.0), agd_optax.agd())
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    ref_updates, ref_state = _agd_update(clipped, agd_optax.agd().init(params), params)
    _assert_trees_close(updates, ref_updates, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(_eta(state), _eta(ref_state), rtol=1e-6)
    # Per-leaf directions are scale-invariant, eta is not: the clip changes the step.
    _, raw_state = _agd_update(grads, agd_optax.agd().init(params), params)
    assert _eta(raw_state) > 1.01 * _eta(state)


# --------------------------------------------------------------------------------------------------
# 8. Reading the state.


def test_tree_get_reads_eta_and_count():
    params, grads = _params_and_grads(BY_NAME["mlp_bias_layernorm"])
    tx = agd_optax.agd()
    state = tx.init(params)
    assert int(optax.tree.get(state, "count")) == 0 and _eta(state) == 0.0
    _, state = _agd_update(grads, state, params)
    assert isinstance(state[0], agd_optax.AGDState)
    assert int(state[0].count) == 1 and int(optax.tree.get(state, "count")) == 1
    assert _eta(state) == float(state[0].eta) > 0.0
    g = _G(state)
    np.testing.assert_allclose(_eta(state), math.log((1 + math.sqrt(1 + 4 * g)) / 2), rtol=1e-6)

    chained = optax.chain(optax.clip_by_global_norm(1e6), agd_optax.agd())  # The clip is a no-op.
    _, c_state = jax.jit(chained.update)(grads, chained.init(params), params)
    np.testing.assert_allclose(_eta(c_state), _eta(state), rtol=1e-6)
    assert int(optax.tree.get(c_state, "count")) == 1


# --------------------------------------------------------------------------------------------------
# 9. Flax NNX.


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(8, 32, rngs=rngs)
        self.n0 = nnx.LayerNorm(32, rngs=rngs)
        self.l1 = nnx.Linear(32, 32, rngs=rngs)
        self.n1 = nnx.LayerNorm(32, rngs=rngs)
        self.l2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        x = math.sqrt(2.0) * nnx.relu(self.n0(self.l0(x)))
        x = math.sqrt(2.0) * nnx.relu(self.n1(self.l1(x)))
        return self.l2(x)


@functools.cache
def _regression_batch():
    @jax.jit
    def make(kx, kw):
        x = jax.random.normal(kx, (128, 8))
        w = jax.random.normal(kw, (8, 4)) / math.sqrt(8)
        return x, 2.0 * jnp.tanh(x @ w)

    return make(_key(10), _key(11))


def _opt_eta(optimizer):
    return _eta(nnx.as_pure(nnx.state(optimizer.opt_state)))


def test_nnx_optimizer_mlp_trains():
    x, y = _regression_batch()
    model = nnx.jit(lambda: NNXMLP(nnx.Rngs(_key(0))))()
    optimizer = nnx.Optimizer(model, agd_optax.agd(), wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean(jnp.sum((model(x) - y) ** 2, axis=-1))

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.25 * losses[0], losses
    assert math.isfinite(_opt_eta(optimizer)) and _opt_eta(optimizer) > 0.0


class NNXAttentionConv(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)  # 3 axes: no name-based role.
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h)
        h = self.norm(nnx.relu(self.conv(h)))
        return self.head(h.mean(axis=1))


def test_nnx_roles_attention_embed_conv_model():
    ids = np.arange(24).reshape(4, 6) % 16
    labels = np.arange(4) % 4
    model = nnx.jit(lambda: NNXAttentionConv(nnx.Rngs(_key(0))))()
    with pytest.raises(agd_optax.RoleError, match="conv/kernel"):
        nnx.Optimizer(model, agd_optax.agd(), wrt=nnx.Param)
    optimizer = nnx.Optimizer(model, agd_optax.agd(roles=agd_optax.nnx_roles(model)), wrt=nnx.Param)

    def loss_fn(model):
        logits = model(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def train_step(model, optimizer):
        optimizer.update(model, nnx.grad(loss_fn)(model))

    before = nnx.as_pure(nnx.state(model, nnx.Param))
    train_step(model, optimizer)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    weights = []
    for (path, b), a in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)
    ):
        where = jax.tree_util.keystr(path)
        delta = _np(a) - _np(b)
        assert np.all(np.isfinite(delta)), where
        if where.endswith(("'kernel']", "'embedding']")):
            weights.append(where)
            assert np.max(np.abs(delta)) > 0.0, where
    assert len(weights) == 7, weights  # embed, query, key, value, out, conv, head.
    assert math.isfinite(_opt_eta(optimizer)) and _opt_eta(optimizer) > 0.0


# --------------------------------------------------------------------------------------------------
# 10. Flax Linen TrainState.


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = math.sqrt(2.0) * nn.relu(nn.LayerNorm()(nn.Dense(32)(x)))
        x = math.sqrt(2.0) * nn.relu(nn.LayerNorm()(nn.Dense(32)(x)))
        return nn.Dense(4)(x)


def test_linen_train_state_trains():
    x, y = _regression_batch()
    model = LinenMLP()
    variables = jax.jit(model.init)(_key(0), x)
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=agd_optax.agd()
    )

    def loss_fn(params):
        return jnp.mean(jnp.sum((model.apply({"params": params}, x) - y) ** 2, axis=-1))

    @jax.jit
    def train_step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(40):
        state, loss = train_step(state)
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.25 * losses[0], losses
    assert int(optax.tree.get(state.opt_state, "count")) == 40
    assert _eta(state.opt_state) > 0.0


# --------------------------------------------------------------------------------------------------
# 11. Sharding.

_SHARDING_SHAPES = {
    "conv": {"kernel": (3, 3, 8, 16), "bias": (16,)},
    "dense0": {"kernel": (16, 32), "bias": (32,)},
    "norm0": {"scale": (32,), "bias": (32,)},
    "dense1": {"kernel": (32, 64), "bias": (64,)},
    "dense2": {"kernel": (64, 8)},
}


@functools.cache
def _sharding_problem():
    """Random params and gradients (NumPy: nothing to compile) whose every sharded dimension is
    divisible by 8."""
    rng = np.random.default_rng(30)

    def normal(shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    is_shape = lambda s: isinstance(s, tuple)
    params = jax.tree.map(
        lambda s: normal(s, 1.0 / math.sqrt(s[-2] if len(s) > 1 else 4)),
        _SHARDING_SHAPES,
        is_leaf=is_shape,
    )
    grads = jax.tree.map(normal, _SHARDING_SHAPES, is_leaf=is_shape)
    return params, grads


def _specs(two_axes):
    if two_axes:  # Mesh (4, 2), axes ("a", "b").
        return {
            "conv": {"kernel": P(None, None, "a", "b"), "bias": P(("a", "b"))},
            "dense0": {"kernel": P("a", "b"), "bias": P("b")},
            "norm0": {"scale": P(("a", "b")), "bias": P()},
            "dense1": {"kernel": P("b", "a"), "bias": P("a")},
            "dense2": {"kernel": P(("a", "b"), None)},
        }
    return {  # Mesh (8,), axis "data": in dims, out dims, a conv's out channels.
        "conv": {"kernel": P(None, None, None, "data"), "bias": P("data")},
        "dense0": {"kernel": P("data", None), "bias": P("data")},
        "norm0": {"scale": P("data"), "bias": P()},
        "dense1": {"kernel": P(None, "data"), "bias": P(None)},
        "dense2": {"kernel": P("data", None)},
    }


@jax.jit
def _two_steps(params, state, grads):
    """Two AGD updates (gain 2), the second at the updated params with other gradients."""
    tx = agd_optax.agd(gain=2.0)
    u1, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u1)
    u2, state = tx.update(jax.tree.map(lambda g: g * g - 0.5, grads), state, params)
    return u1, u2, optax.apply_updates(params, u2), state


@functools.cache
def _unsharded_two_steps():
    params, grads = _sharding_problem()
    state = agd_optax.agd().init(params)
    return state, _two_steps(params, state, grads)


@pytest.mark.parametrize(
    ("two_axes", "axis_type"),
    [(False, AxisType.Auto), (False, AxisType.Explicit), (True, AxisType.Explicit)],
    ids=["mesh8-auto", "mesh8-explicit", "mesh4x2-explicit"],  # Explicit: make_mesh's default.
)
def test_sharded_updates_match_unsharded(two_axes, axis_type):
    assert jax.device_count() == 8
    if two_axes:
        mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(axis_type, axis_type))
    else:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    params, grads = _sharding_problem()
    ref_state0, (*ref_trees, ref_state) = _unsharded_two_steps()

    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs(two_axes))
    sh_params = jax.device_put(params, shardings)
    sh_grads = jax.device_put(grads, shardings)
    assert sh_params["dense0"]["kernel"].addressable_shards[0].data.size == 16 * 32 // 8
    with jax.set_mesh(mesh):
        sh_state0 = agd_optax.agd().init(sh_params)
        *sh_trees, sh_state = _two_steps(sh_params, sh_state0, sh_grads)
    assert _avals(sh_state0) == _avals(ref_state0)

    # Float32 rounding: the partitioned norms and the two programs' machine code round apart by
    # up to about 2e-7 on these weights of size ~0.5 (a sharding error would be far larger).
    for a, b in zip(sh_trees, ref_trees):
        _assert_trees_close(a, b, rtol=1e-6, atol=5e-7)
    assert jax.tree.structure(sh_state) == jax.tree.structure(ref_state)
    assert _avals(sh_state) == _avals(ref_state)
    # eta and G are the same number, up to the order of a partitioned sum (a few ulp at most).
    for field in ("eta", "G"):
        a, b = optax.tree.get(sh_state, field), optax.tree.get(ref_state, field)
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=4)
    assert int(sh_state[0].count) == 2
    # Updates and new params stay sharded like the params (no gather); the state is replicated.
    for tree in sh_trees:
        for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
            assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
    for x in jax.tree.leaves(sh_state):
        assert x.sharding.is_fully_replicated


# --------------------------------------------------------------------------------------------------
# 12. Zero gradients.


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_all_zero_gradient_gives_zero_update(problem):
    params, _ = _params_and_grads(problem)
    zeros = jax.tree.map(np.zeros_like, params)
    tx = agd_optax.agd()
    for update in (tx.update, _agd_update):
        updates, state = update(zeros, tx.init(params), params)
        for u in jax.tree.leaves(updates):
            assert np.all(_np(u) == 0.0)
        assert _all_finite(updates) and _all_finite(state)
        assert _eta(state) == 0.0 and _G(state) == 0.0
        _assert_trees_equal(optax.apply_updates(params, updates), params)


@pytest.mark.parametrize("problem", CORE, ids=_ids)
def test_one_zero_layer_gives_zero_update_for_it_only(problem):
    params, grads = _params_and_grads(problem)
    frozen = sorted(params)[0]  # A whole layer: its kernel, and its bias when it has one.
    assert "kernel" in params[frozen]
    grads = {
        name: jax.tree.map(np.zeros_like, layer) if name == frozen else layer
        for name, layer in grads.items()
    }
    updates, state = _agd_update(grads, agd_optax.agd().init(params), params)
    assert _all_finite(updates) and _all_finite(state)
    assert math.isfinite(_eta(state)) and _eta(state) > 0.0
    for name, layer in updates.items():
        for leaf, u in layer.items():
            if name == frozen:
                assert np.all(_np(u) == 0.0), (name, leaf)
            elif leaf == "kernel":
                assert np.any(_np(u) != 0.0), (name, leaf)
