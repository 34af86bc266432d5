"""The calibration's candidate AGD variants: each builds, steps and stays finite; the table."""

import jax
import numpy as np
import optax
import pytest
import zoo

from benchmarks.variants import CANDIDATES
from benchmarks.variants.calibrate import table

PROBLEM = zoo.matrix_parabola()  # One small leaf: one quick compilation per candidate.


@pytest.fixture(scope="module")
def params_and_grads():
    params = jax.jit(PROBLEM.init)(jax.random.key(0, impl="rbg"))
    return params, jax.jit(jax.grad(PROBLEM.loss))(params)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_candidate_steps_and_lowers_the_loss(name, params_and_grads):
    params, _ = params_and_grads
    candidate = CANDIDATES[name]
    tx = candidate.build(None)  # Roles inferred from the zoo's Flax-style names.

    @jax.jit
    def run(params):
        p, s = params, tx.init(params)
        for _ in range(3):
            u, s = tx.update(jax.grad(PROBLEM.loss)(p), s, p)
            p = optax.apply_updates(p, u)
        if candidate.eval_params is not None:
            p = candidate.eval_params(s, p)
        return PROBLEM.loss(params), PROBLEM.loss(p)

    before, after = run(params)
    assert np.isfinite(float(after)) and float(after) < float(before), (name, before, after)


def test_table_lists_every_candidate_run_with_mean_and_std():
    records = [
        dict(name="agd", workload=w, seed=s, final=0.5 + 0.1 * s)
        for w in ("digits_fcn", "mnist1d_mlp")
        for s in (0, 1, 2)
    ]
    text = table(records)
    assert "| `agd` | the paper's algorithm | 0.6000 ± 0.1000 (3) |" in text
    assert text.count("\n") == 2  # Header, rule, and the one candidate run.


def test_orthogonalise_brings_every_singular_value_near_one():
    from benchmarks.variants.round_two import orthogonalise

    for shape in [(4, 16, 8), (2, 8, 16), (1, 10, 10)]:
        x = jax.random.normal(jax.random.key(0), shape)
        o = orthogonalise(x)
        assert o.shape == shape
        s = np.linalg.svd(np.asarray(o), compute_uv=False)
        assert s.min() > 0.6 and s.max() < 1.3, (shape, s.min(), s.max())
        # The same singular vectors: O is close to U V^T in direction.
        u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
        polar = u @ vt
        cos = np.sum(polar * np.asarray(o), axis=(1, 2)) / (
            np.linalg.norm(polar, axis=(1, 2)) * np.linalg.norm(np.asarray(o), axis=(1, 2))
        )
        assert cos.min() > 0.95, cos


def test_weight_matrices_are_per_kernel_position_and_round_trip():
    import agd_optax
    from benchmarks.variants.round_two import _matrices

    x = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    [lay] = agd_optax.resolve_layouts({"conv": {"kernel": x}})
    mats, back = _matrices(x, lay)
    assert mats.shape == (9, 32, 16)
    np.testing.assert_array_equal(np.asarray(mats[4]), np.asarray(x[1, 1]).T)
    np.testing.assert_array_equal(np.asarray(back(mats)), np.asarray(x))


def _one_step(tx, grads):
    params = jax.tree.map(np.zeros_like, grads)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return updates


def test_ortho_frob_moves_each_weight_by_agd_momentums_frobenius_budget():
    import agd_optax
    from benchmarks.variants.round_two import ortho_frob

    grads = {
        f"layers_{i}": {"kernel": jax.random.normal(jax.random.key(i), shape)}
        for i, shape in enumerate([(40, 64), (64, 64), (64, 10)])
    }
    ours = _one_step(ortho_frob(None), grads)
    reference = _one_step(agd_optax.agd_momentum(), grads)
    for name in grads:
        a = float(np.linalg.norm(ours[name]["kernel"]))
        b = float(np.linalg.norm(reference[name]["kernel"]))
        assert 0.6 < a / b < 1.3, (name, a, b)  # Newton-Schulz's singular values are 0.7-1.2.


def test_ortho_nuclear_takes_eta_from_the_nuclear_norms():
    from agd_optax._floats import eta_of
    from benchmarks.variants.round_two import ortho_nuclear

    shapes = [(40, 64), (64, 10)]
    grads = {
        f"layers_{i}": {"kernel": jax.random.normal(jax.random.key(i), shape)}
        for i, shape in enumerate(shapes)
    }
    updates = _one_step(ortho_nuclear(None), grads)
    total = 0.0
    for name, shape in zip(grads, shapes):
        g = np.asarray(grads[name]["kernel"], np.float64)
        d_in, d_out = shape
        total += (
            np.sqrt(d_out / d_in) * np.linalg.svd(g, compute_uv=False).sum() / np.sqrt(min(shape))
        )
    eta = float(eta_of(np.float32(total / 2)))
    for name, (d_in, d_out) in zip(grads, shapes):
        top = np.linalg.svd(np.asarray(updates[name]["kernel"]), compute_uv=False).max()
        expected = eta / 2 * np.sqrt(d_out / d_in)  # Spectral norm about 1, times (eta/L) s.
        assert 0.6 < top / expected < 1.35, (name, top, expected)
