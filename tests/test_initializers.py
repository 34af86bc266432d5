"""AGD's scaled orthogonal initialisation: every nonzero singular value equals s(W)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import agd_optax


def _singular_values(w):
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_dense_singular_values(shape):
    w = agd_optax.dense_init()(jax.random.key(0), shape)
    assert w.shape == shape and w.dtype == jnp.float32
    sv = _singular_values(w)
    assert len(sv) == min(shape)
    np.testing.assert_allclose(sv, math.sqrt(shape[1] / shape[0]), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (3, 3, 16, 4), (5, 4, 6), (2, 3, 3, 4, 4)])
def test_conv_singular_values_per_position(shape):
    w = np.asarray(agd_optax.conv_init()(jax.random.key(1), shape))
    *spatial, d_in, d_out = shape
    s = math.sqrt(d_out / d_in) / math.sqrt(math.prod(spatial))
    slices = w.reshape(-1, d_in, d_out)
    for sl in slices:
        np.testing.assert_allclose(_singular_values(sl), s, rtol=1e-5)
    # Positions are independent draws.
    assert not np.allclose(slices[0], slices[1])


def test_grouped_conv_blocks_are_orthogonal():
    groups, shape = 4, (3, 3, 2, 8)  # in 8 = 4 x 2, out 8 = 4 x 2
    w = np.asarray(agd_optax.conv_init(groups=groups)(jax.random.key(2), shape))
    s = math.sqrt(8 / 8) / 3
    for sl in w.reshape(-1, 2, 8):
        for block in np.split(sl, groups, axis=1):
            np.testing.assert_allclose(_singular_values(block), s, rtol=1e-5)


def test_stacked_and_multi_axis_dense():
    init = agd_optax.scaled_orthogonal(agd_optax.dense(in_axes=1, out_axes=(2, 3), stack_axes=0))
    w = np.asarray(init(jax.random.key(3), (3, 16, 2, 4)))
    for layer in w:
        np.testing.assert_allclose(
            _singular_values(layer.reshape(16, 8)), math.sqrt(8 / 16), rtol=1e-5
        )


def test_dtype_and_determinism():
    init = agd_optax.dense_init()
    a = init(jax.random.key(4), (8, 8), jnp.bfloat16)
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(init(jax.random.key(4), (8, 8)), init(jax.random.key(4), (8, 8)))


def test_only_weights_can_be_initialised():
    with pytest.raises(ValueError, match="weights only"):
        agd_optax.scaled_orthogonal("bias")


def test_kernel_init_in_nnx_and_linen():
    layer = nnx.Conv(4, 8, (3, 3), kernel_init=agd_optax.conv_init(), rngs=nnx.Rngs(0))
    for sl in np.asarray(layer.kernel[...]).reshape(-1, 4, 8):
        np.testing.assert_allclose(_singular_values(sl), math.sqrt(2) / 3, rtol=1e-5)
    params = nn.Dense(5, kernel_init=agd_optax.dense_init()).init(
        jax.random.key(0), jnp.zeros((1, 20))
    )
    np.testing.assert_allclose(
        _singular_values(params["params"]["kernel"]), math.sqrt(5 / 20), rtol=1e-5
    )


def test_reinitialize_tree_by_roles():
    params = {
        "conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.full(4, 7.0)},
        "dense": {"kernel": jnp.zeros((36, 10), jnp.bfloat16)},
        "ln": {"scale": jnp.ones(10)},
    }
    new = agd_optax.reinitialize(jax.random.key(5), params)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert new["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(new["conv"]["bias"], params["conv"]["bias"])  # kept as they were
    np.testing.assert_array_equal(new["ln"]["scale"], params["ln"]["scale"])
    np.testing.assert_allclose(
        _singular_values(new["dense"]["kernel"]), math.sqrt(10 / 36), rtol=1e-2
    )
    for sl in np.asarray(new["conv"]["kernel"]).reshape(-1, 2, 4):
        np.testing.assert_allclose(_singular_values(sl), math.sqrt(2) / 3, rtol=1e-5)
    # Explicit roles: a PyTorch-layout matrix (out, in).
    torch = agd_optax.reinitialize(
        jax.random.key(6), {"w": jnp.zeros((4, 12))}, agd_optax.dense(1, 0)
    )
    np.testing.assert_allclose(_singular_values(torch["w"]), math.sqrt(4 / 12), rtol=1e-5)


def test_jitted_reinitialize_runs_one_unbatched_qr_at_a_time():
    """Every QR of a jitted ``reinitialize`` factors one matrix: on CPU, jaxlib 0.10 splits a
    batched QR over XLA's thread pool and waits for the pieces, and two such QRs of one program
    running at once could take every thread of a 2-core machine's pool and hang for ever."""
    params = {f"conv{i}": jnp.zeros((5, 16, 16)) for i in range(3)} | {"out": jnp.zeros((16, 4))}
    roles = {f"conv{i}": agd_optax.conv() for i in range(3)} | {"out": agd_optax.dense()}
    lowered = jax.jit(lambda key: agd_optax.reinitialize(key, params, roles)).lower(
        jax.random.key(0)
    )
    calls = re.findall(r"custom_call @(lapack_\w+).*num_batch_dims = \"(\d+)\"", lowered.as_text())
    assert calls, "no LAPACK call found: the test no longer sees the QRs"
    for name, batch_dims in calls:
        assert batch_dims == "0", f"{name} factors a batch of matrices at once"
