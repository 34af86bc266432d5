"""Parity with the official PyTorch implementation, step for step, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_nets import CASES, REFERENCE, load_case, loss_fn, to_flax, to_torch

import agd_optax

RTOL = 1e-7


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE)


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_matches_pytorch_reference(reference, case, x64):
    c = load_case(reference, case)
    params = jax.tree.map(jnp.asarray, c["params0"])
    tx = agd_optax.agd(gain=c["gain"])
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(c["apply"], c["loss"], p, c["x"], c["y"])
        )(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses, etas = [], []
    for _ in range(len(c["losses"])):
        params, state, loss = step(params, state)
        losses.append(loss)
        etas.append(optax.tree.get(state, "eta"))

    assert optax.tree.get(state, "eta").dtype == jnp.float64
    assert _rel_err(losses, c["losses"]) < RTOL
    assert _rel_err(etas, c["etas"]) < RTOL
    for name, w in params.items():
        assert _rel_err(w["kernel"], c["params1"][name]["kernel"]) < RTOL, name


def test_layout_conversion_round_trips(reference):
    for key in reference.files:
        if "/W0_" in key:
            w = reference[key]
            np.testing.assert_array_equal(to_torch(to_flax(w)), w)


def test_torch_layout_roles_match_flax_layout(reference, x64):
    """The same step in PyTorch's (out, in) layout with explicit roles: roles, not axis numbers."""
    c = load_case(reference, "fcn_mse")
    flax_params = jax.tree.map(jnp.asarray, c["params0"])
    grads = jax.grad(lambda p: loss_fn(c["apply"], c["loss"], p, c["x"], c["y"]))(flax_params)
    torch_grads = jax.tree.map(lambda g: jnp.asarray(to_torch(np.asarray(g))), grads)
    torch_roles = agd_optax.dense(in_axes=1, out_axes=0)

    u_flax, s_flax = agd_optax.agd().update(grads, agd_optax.agd().init(flax_params))
    tx = agd_optax.agd(roles=torch_roles)
    u_torch, s_torch = tx.update(torch_grads, tx.init(torch_grads))
    np.testing.assert_allclose(s_torch[0].eta, s_flax[0].eta, rtol=1e-14)
    for name in u_flax:
        np.testing.assert_allclose(
            to_torch(np.asarray(u_flax[name]["kernel"])), u_torch[name]["kernel"], rtol=1e-13
        )
