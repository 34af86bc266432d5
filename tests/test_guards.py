"""What AGD refuses or survives: huge finite gradients, bad gains, updates that do not fit the
parameters, and param_specs outside shard_map."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import agd_optax

F32_MAX = float(np.finfo(np.float32).max)


def _tree(rng, dtype=np.float32):
    """A dense layer with its bias, a 3x3 conv and a norm-layer scale."""
    return {
        "dense": {
            "kernel": rng.normal(size=(6, 3)).astype(dtype),
            "bias": rng.normal(size=3).astype(dtype),
        },
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(dtype)},
        "norm": {"scale": rng.normal(size=4).astype(dtype)},
    }


def _norm(x, axis=None):
    """Frobenius norm in float64 without overflow: on x / max|x|, then scaled back."""
    m = np.max(np.abs(x), axis=axis, keepdims=axis is not None)
    return np.linalg.norm(x / m, axis=axis, keepdims=axis is not None) * m


def _reference(grads):
    """The AGD step of ``_tree`` in float64 NumPy: (updates with gain 1, eta, G)."""
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    s_d, s_c = math.sqrt(3 / 6), math.sqrt(4 / 2) / 3
    n_d = _norm(g["dense"]["kernel"])
    per_pos = _norm(g["conv"]["kernel"], axis=(2, 3))
    G = (s_d * n_d + s_c * per_pos.sum()) / 2
    eta = math.log1p(2 * G / (1 + math.sqrt(1 + 4 * G)))  # log((1 + sqrt(1 + 4G)) / 2), exact.
    step = eta / 2
    updates = {
        "dense": {
            "kernel": -step * s_d * g["dense"]["kernel"] / n_d,
            "bias": -step * s_d * g["dense"]["bias"] / n_d,
        },
        "conv": {"kernel": -step * s_c * g["conv"]["kernel"] / per_pos},
        "norm": {"scale": -step * g["norm"]["scale"] / _norm(g["norm"]["scale"])},
    }
    return updates, eta, G


def _scaled(tree, factor):
    """Every leaf times ``factor``, or, for "max", rescaled so its largest entry is float32's max."""
    if factor == "max":
        return jax.tree.map(
            lambda x: (x / np.abs(x).max() * np.float64(F32_MAX)).astype(np.float32), tree
        )
    return jax.tree.map(lambda x: (x.astype(np.float64) * factor).astype(np.float32), tree)


@jax.jit
def _update(grads, params):
    tx = agd_optax.agd()
    return tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("factor", [1.0, 2.0**70, 1e30, 1e37, "max"])
def test_any_finite_gradient_gives_the_float64_step(factor):
    """Squares of float32 gradients overflow from about 1e19; the step must not."""
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = _scaled(_tree(rng), factor)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grads))
    updates, state = _update(grads, params)
    want, eta, G = _reference(grads)

    assert float(state[0].eta) == pytest.approx(eta, rel=1e-6)
    if G < F32_MAX:
        assert float(state[0].G) == pytest.approx(G, rel=1e-6)
    else:  # Beyond float32: reported as Inf, while eta (about log(G) / 2) stays exact.
        assert float(state[0].G) == math.inf
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        w = want
        for key in path:
            w = w[key.key]
        assert u.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(u, np.float64), w, rtol=2e-6, atol=1e-7, err_msg=str(path)
        )


def _normal_at(tree, dtype, end):
    """``tree`` in ``dtype`` (from float64), rescaled so its smallest entry is twice the smallest
    normal number (``end="min"``) or its largest is the largest finite one (``"max"``)."""
    info = jnp.finfo(dtype)
    leaves = jax.tree.leaves(tree)
    if end == "min":
        factor = 2.0 * float(info.tiny) / min(np.abs(x).min() for x in leaves)
    else:
        factor = float(info.max) / max(np.abs(x).max() for x in leaves)
    return jax.tree.map(lambda x: jnp.asarray(x.astype(np.float64) * factor, dtype), tree)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        *[(jnp.float32, s) for s in ("min", 1e-34, 1e-30, 1e-20, 1e-10, 1e-4, 1e10, 1e30, "max")],
        *[(jnp.bfloat16, s) for s in ("min", 1e-30, 1e-20, 1e-8, 1e20, "max")],
    ],
)
def test_tiny_and_huge_gradients_move_each_layer_by_agds_step(dtype, scale):
    """From gradients whose every entry is a normal number just above the smallest, to ones
    that reach the largest: squares under- or overflow, the step must not (float64 reference)."""
    rng = np.random.default_rng(6)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), _tree(rng))
    raw = jax.tree.map(lambda x: x.astype(np.float64), _tree(rng))
    if isinstance(scale, str):
        grads = _normal_at(raw, dtype, scale)
    else:
        grads = jax.tree.map(lambda x: jnp.asarray(x * scale, dtype), raw)
    tiny = float(jnp.finfo(dtype).tiny)
    assert all(np.abs(np.asarray(x, np.float64)).min() >= tiny for x in jax.tree.leaves(grads))
    updates, state = _update(grads, params)
    want, eta, G = _reference(grads)

    assert float(state[0].eta) == pytest.approx(eta, rel=1e-6)
    assert float(state[0].G) == pytest.approx(G, rel=1e-6) if G < F32_MAX else True
    _assert_updates_match(updates, want, dtype, every_layer_moves=True)


def _assert_updates_match(updates, want, dtype, every_layer_moves):
    """Each update in ``dtype`` and within its rounding (and 4 smallest normal numbers) of the
    float64 one at the same path in ``want``; every leaf non-zero if ``every_layer_moves``
    (otherwise a leaf moves wherever its float64 update is a normal number)."""
    tiny = float(jnp.finfo(dtype).tiny)
    rtol = 2e-6 if dtype == jnp.float32 else 2.0**-7
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        w = want
        for key in path:
            w = w[key.key]
        assert u.dtype == dtype
        if every_layer_moves:
            assert np.any(np.asarray(u, np.float64) != 0.0), path
        np.testing.assert_allclose(
            np.asarray(u, np.float64), w, rtol=rtol, atol=4 * tiny, err_msg=str(path)
        )


def test_rescaled_step_agrees_with_plain_step():
    """Gradients times 2**70 (rescaled path) against the same gradients (plain path): norms and G
    scale by exactly 2**70, so G agrees to rounding and each update is the same direction."""
    rng = np.random.default_rng(1)
    params, grads = _tree(rng), _tree(rng)
    u1, s1 = _update(grads, params)
    u2, s2 = _update(_scaled(grads, 2.0**70), params)
    assert float(s2[0].G) == pytest.approx(float(s1[0].G) * 2.0**70, rel=2e-7)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a / s1[0].eta, b / s2[0].eta, rtol=1e-6, atol=1e-8)


def test_rescaled_step_on_stacked_layers():
    """Stacked weights with their biases and stacked norm parameters: each slice is normalised on
    its own in the rescaled path too (slices of very different sizes, one far beyond 1e19)."""
    rng = np.random.default_rng(5)
    roles = {
        "blocks": {
            "kernel": agd_optax.dense(stack_axes=0),
            "bias": agd_optax.bias(),
            "scale": agd_optax.norm(stack_axes=0),
        }
    }
    shapes = {"blocks": {"kernel": (3, 5, 4), "bias": (3, 4), "scale": (3, 4)}}
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=is_shape)
    grads = jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=is_shape)
    per_slice = np.array([1e-3, 1.0, 1e3])[:, None]
    grads = jax.tree.map(lambda g: g * per_slice.reshape((3,) + (1,) * (g.ndim - 1)), grads)
    tx = agd_optax.agd(roles=roles)
    update = jax.jit(tx.update)
    u1, s1 = update(_scaled(grads, 1.0), tx.init(params), params)
    u2, s2 = update(_scaled(grads, 1e30), tx.init(params), params)
    assert float(s2[0].G) == pytest.approx(float(s1[0].G) * 1e30, rel=1e-6)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a / s1[0].eta, b / s2[0].eta, rtol=1e-5, atol=1e-8)


def test_float64_gradients_beyond_the_square_range(x64):
    rng = np.random.default_rng(2)
    params = _tree(rng, np.float64)
    grads = jax.tree.map(lambda x: x * 1e200, _tree(rng, np.float64))
    updates, state = _update(grads, params)
    want, eta, G = _reference(grads)
    assert float(state[0].eta) == pytest.approx(eta, rel=1e-12)
    assert float(state[0].G) == pytest.approx(G, rel=1e-12)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(u, w, rtol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_huge_gradients_with_a_nonfinite_entry_are_still_all_nan(bad):
    rng = np.random.default_rng(3)
    params, grads = _tree(rng), _scaled(_tree(rng), 1e30)
    grads["norm"]["scale"][0] = bad
    updates, state = _update(grads, params)
    assert math.isnan(float(state[0].eta)) and math.isnan(float(state[0].G))
    assert all(np.all(np.isnan(u)) for u in jax.tree.leaves(updates))


def test_huge_gradients_on_parameter_shards_inside_shard_map():
    """The rescaled path's reductions are completed across the mesh like the plain path's."""
    assert jax.device_count() == 8
    rng = np.random.default_rng(4)
    params = {
        "dense": {
            "kernel": rng.normal(size=(16, 8)).astype(np.float32),
            "bias": rng.normal(size=8).astype(np.float32),
        },
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 8)).astype(np.float32)},
        "norm": {"scale": rng.normal(size=8).astype(np.float32)},
    }
    grads = _scaled(jax.tree.map(lambda x: rng.normal(size=x.shape), params), 1e30)
    grads["conv"]["kernel"][0, 0] *= 1e-20  # Positions far apart: per-position exponents.
    specs = {
        "dense": {"kernel": P("x", None), "bias": P()},
        "conv": {"kernel": P(None, None, None, "x")},
        "norm": {"scale": P("x")},
    }
    want_updates, want_state = _update(grads, params)
    tx = agd_optax.agd(param_specs=specs)
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.jit(
        jax.shard_map(
            lambda g, s, p: tx.update(g, s, p),
            mesh=mesh,
            in_specs=(specs, P(), specs),
            out_specs=(specs, P()),
        )
    )
    put = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree, specs
    )
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    updates, state = sharded(put(grads), state, put(params))
    assert float(state[0].eta) == pytest.approx(float(want_state[0].eta), rel=1e-6)
    assert float(state[0].G) == pytest.approx(float(want_state[0].G), rel=1e-6)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# The gain.


@pytest.mark.parametrize(
    "gain", [0.0, -1.0, 0, math.nan, math.inf, -math.inf, np.float32(0.0), np.asarray(-2.0)]
)
def test_gain_must_be_finite_and_positive(gain):
    for factory in (agd_optax.agd, agd_optax.agd_momentum):
        with pytest.raises(ValueError, match="gain must be a finite number above 0"):
            factory(gain)


@pytest.mark.parametrize("gain", ["1.0", True, None, np.ones(2), 1j])
def test_gain_must_be_a_number(gain):
    with pytest.raises((TypeError, ValueError), match="gain must be"):
        agd_optax.agd(gain)


def test_good_gains_schedules_and_traced_gains_are_taken():
    params = {"dense": {"kernel": jnp.ones((4, 2))}}
    grads = {"dense": {"kernel": jnp.full((4, 2), 0.5)}}
    for gain in (1, 10.0, np.float32(0.5), jnp.asarray(2.0), optax.linear_schedule(1.0, 2.0, 5)):
        tx = agd_optax.agd(gain)
        tx.update(grads, tx.init(params), params)

    tx = optax.inject_hyperparams(agd_optax.agd)(gain=3.0)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    updates, state = step(grads, state, params)
    assert float(state.hyperparams["gain"]) == 3.0

    @jax.jit
    def traced(gain):
        t = agd_optax.agd(gain)
        return t.update(grads, t.init(params), params)[0]

    a, b = traced(2.0), traced(4.0)
    np.testing.assert_allclose(2.0 * a["dense"]["kernel"], b["dense"]["kernel"], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Updates against params, and param_specs.


def test_updates_whose_shapes_differ_from_params_name_the_leaf():
    params = {"a": {"kernel": jnp.ones((4, 2))}, "b": {"kernel": jnp.ones((3, 3))}}
    tx = agd_optax.agd()
    state = tx.init(params)
    updates = {"a": {"kernel": jnp.ones((2, 4))}, "b": {"kernel": jnp.ones((3, 3))}}
    with pytest.raises(
        ValueError, match=r"'a/kernel' has shape \(2, 4\) in the updates but \(4, 2\)"
    ):
        tx.update(updates, state, params)
    with pytest.raises(ValueError, match="'a/kernel'"):
        jax.jit(tx.update)(updates, state, params)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_param_specs_outside_shard_map_say_where_they_belong(jit):
    params = {"dense": {"kernel": jnp.ones((8, 4))}}
    tx = agd_optax.agd(param_specs={"dense": {"kernel": P("model", None)}})
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match="param_specs.*inside jax.shard_map"):
        update(params, tx.init(params), params)


def _straddling(rng, dtype, low=2.0):
    """Dense, conv (with biases) and norm-layer gradients, each weight's norm (each conv kernel
    position's) at the largest, the smallest or an ordinary scale, drawn at random: the norms of
    one step sit at both ends of the float range at once, a long norm beside one of one entry.
    The smallest entry of a leaf at the small end is ``low`` times the smallest normal number."""
    info = jnp.finfo(dtype)
    shapes = {
        "wide": {"kernel": (128, 128), "bias": (128,)},
        "one": {"kernel": (1, 1)},
        "conv": {"kernel": (3, 3, 8, 16), "bias": (16,)},
        "norm": {"scale": (16,)},
    }
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    grads = jax.tree.map(lambda s: rng.standard_normal(s), shapes, is_leaf=is_shape)

    def put(x, end):
        if end == "min":
            return x / np.abs(x).min() * low * float(info.tiny)
        if end == "max":
            return x / np.abs(x).max() * float(info.max)
        return x

    ends = ("min", "max", "ordinary")
    for layer in grads.values():
        for name, x in layer.items():
            if x.ndim == 4:  # Each kernel position at its own end.
                for i, j in np.ndindex(x.shape[:2]):
                    x[i, j] = put(x[i, j], rng.choice(ends))
            else:
                layer[name] = put(x, rng.choice(ends))
    return {
        k: {n: np.asarray(jnp.asarray(x, dtype), np.float64) for n, x in v.items()}
        for k, v in grads.items()
    }


@pytest.mark.parametrize("make", [agd_optax.agd, agd_optax.agd_momentum])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_norms_at_both_ends_of_the_range_in_one_step(x64, make, dtype, seed):
    """Every finite, non-zero gradient moves its layer by AGD's step, whichever ends of the range
    the other layers' norms sit at: against AGD in float64, where no square over- or
    underflows. For agd_momentum the small end is 20 times the smallest normal number, so that
    the running average's first value, a tenth of the gradient, is a normal number too."""
    low = 2.0 if make is agd_optax.agd else 20.0
    grads = _straddling(np.random.default_rng(seed), dtype, low)
    params = jax.tree.map(np.ones_like, grads)
    tx = make()
    narrow = jax.tree.map(lambda x: jnp.asarray(x, dtype), (grads, params))
    updates, state = jax.jit(tx.update)(narrow[0], tx.init(narrow[1]), narrow[1])
    want, want_state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert state[0].eta.dtype == jnp.float32 and want_state[0].eta.dtype == jnp.float64
    assert float(state[0].eta) == pytest.approx(float(want_state[0].eta), rel=1e-6)
    _assert_updates_match(updates, want, dtype, every_layer_moves=False)


@pytest.mark.parametrize("make", [agd_optax.agd, agd_optax.agd_momentum])
def test_a_bias_whose_squares_overflow_moves_with_its_weight(x64, make):
    """A bias is divided by its weight's norm, and its own norm enters nothing: entries of 1e30,
    whose squares overflow float32, leave G and eta those of the weights and move the bias by
    its weight's step (against the same update in float64)."""
    rng = np.random.default_rng(5)
    grads = {
        "dense": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3) * 1e30},
        "norm": {"scale": rng.standard_normal(3)},
    }
    params = jax.tree.map(np.ones_like, grads)
    tx = make()
    narrow = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (grads, params))
    updates, state = jax.jit(tx.update)(narrow[0], tx.init(narrow[1]), narrow[1])
    want, want_state = jax.jit(tx.update)(grads, tx.init(params), params)
    calm = {**narrow[0], "dense": {**narrow[0]["dense"], "bias": jnp.ones(3, jnp.float32)}}
    _, calm_state = jax.jit(tx.update)(calm, tx.init(narrow[1]), narrow[1])
    assert float(state[0].eta) == float(calm_state[0].eta)
    assert float(state[0].eta) == pytest.approx(float(want_state[0].eta), rel=1e-6)
    _assert_updates_match(updates, want, jnp.float32, every_layer_moves=True)


@pytest.mark.parametrize("make", [agd_optax.agd, agd_optax.agd_momentum])
@pytest.mark.parametrize("leaf", [("dense", "bias"), ("norm", "scale")])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_entry_outside_the_weights_makes_every_update_nan(make, leaf, bad):
    """A NaN or Inf in a bias or a norm-layer gradient, whose norms are not in G, still makes
    eta, G and every update NaN, as one in a weight's gradient does."""
    rng = np.random.default_rng(6)
    grads = {
        "dense": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)},
        "norm": {"scale": rng.standard_normal(3)},
    }
    grads = jax.tree.map(lambda x: np.asarray(x, np.float32), grads)
    grads[leaf[0]][leaf[1]][1] = bad
    params = jax.tree.map(np.ones_like, grads)
    tx = make()
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert math.isnan(float(state[0].eta)) and math.isnan(float(state[0].G))
    assert all(np.all(np.isnan(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("make", [agd_optax.agd, agd_optax.agd_momentum])
def test_a_small_norm_beside_one_in_the_exact_range_counts_in_G(x64, make):
    """A weight whose gradient's squares are subnormal (entries of 1e-20) beside one whose plain
    sum of squares is exact (entries of 1e-15): G, of which the smaller is a part in 1e5, is
    exact to float32 rounding, and each layer moves by its own step."""
    rng = np.random.default_rng(7)
    grads = {
        "a": {"kernel": rng.standard_normal((4, 4)) * 1e-15},
        "b": {"kernel": rng.standard_normal((4, 4)) * 1e-20},
    }
    params = jax.tree.map(np.ones_like, grads)
    tx = make()
    narrow = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (grads, params))
    updates, state = jax.jit(tx.update)(narrow[0], tx.init(narrow[1]), narrow[1])
    want, want_state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert float(state[0].G) == pytest.approx(float(want_state[0].G), rel=1e-6)
    assert float(state[0].eta) == pytest.approx(float(want_state[0].eta), rel=1e-6)
    _assert_updates_match(updates, want, jnp.float32, every_layer_moves=True)


@pytest.mark.parametrize("make", [agd_optax.agd, agd_optax.agd_momentum])
def test_a_bias_far_above_its_weights_small_norm_moves_by_its_step(x64, make):
    """A bias of entries 1e16 beside a weight whose norm is below float32's exact range (entries
    of 1e-22): the bias's update, about 1e36, is a float32 number, and the step forms it as one
    (its gradient times the weight's rescaling power of two alone would overflow)."""
    rng = np.random.default_rng(8)
    grads = {
        "dense": {"kernel": rng.standard_normal((4, 3)) * 1e-22, "bias": np.full(3, 1e16)},
        "out": {"kernel": rng.standard_normal((3, 2))},
    }
    params = jax.tree.map(np.ones_like, grads)
    tx = make()
    narrow = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (grads, params))
    updates, state = jax.jit(tx.update)(narrow[0], tx.init(narrow[1]), narrow[1])
    want, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.all(np.abs(want["dense"]["bias"]) > 1e30)
    _assert_updates_match(updates, want, jnp.float32, every_layer_moves=True)


@pytest.mark.parametrize("make", [agd_optax.agd, agd_optax.agd_momentum])
def test_a_norm_of_millions_of_entries_is_summed_to_float32_rounding(make):
    """G of one square weight of 4 million entries (so G is its gradient's norm) against the
    float64 sum: a float32 sum of squares taken one entry after another is about 1e-3 off here
    (G half that)."""
    rng = np.random.default_rng(9)
    grad = (rng.random((2048, 2048)) + 1.0).astype(np.float32)
    grads = {"dense": {"kernel": jnp.asarray(grad)}}
    params = jax.tree.map(jnp.ones_like, grads)
    tx = make()
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    want = math.sqrt(float(np.sum(grad.astype(np.float64) ** 2)))
    assert float(state[0].G) == pytest.approx(want, rel=1e-6)
