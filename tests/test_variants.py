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


def test_table_lists_every_candidate_with_mean_and_std():
    records = [
        dict(name="agd", workload=w, seed=s, final=0.5 + 0.1 * s)
        for w in ("digits_fcn", "mnist1d_mlp")
        for s in (0, 1, 2)
    ]
    text = table(records)
    assert "| `agd` | the paper's algorithm | 0.6000 ± 0.1000 (3) |" in text
    assert text.count("\n") == len(CANDIDATES) + 1
