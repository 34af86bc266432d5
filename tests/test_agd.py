"""Hand-computed steps of each AGD rule: weights, convs, biases, norm layers, stacks, groups."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import agd_optax


def _eta(G):
    return math.log((1 + math.sqrt(1 + 4 * G)) / 2)


def _step(params, grads, gain=1.0, roles=None):
    tx = agd_optax.agd(gain, roles=roles)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return (
        jax.tree.map(np.asarray, updates),
        float(optax.tree.get(state, "eta")),
        float(optax.tree.get(state, "G")),
    )


def test_dense_and_conv_first_step_by_hand(x64):
    rng = np.random.default_rng(0)
    gd = rng.normal(size=(6, 3))  # dense 6 -> 3
    gc = rng.normal(size=(3, 3, 2, 4))  # conv 3x3, 2 -> 4
    params = {"d": {"kernel": np.zeros((6, 3))}, "conv": {"kernel": np.zeros((3, 3, 2, 4))}}
    grads = {"d": {"kernel": gd}, "conv": {"kernel": gc}}
    updates, eta, G = _step(params, grads, gain=3.0)

    s_d, s_c = math.sqrt(3 / 6), math.sqrt(4 / 2) / 3
    per_pos = np.array([[np.linalg.norm(gc[i, j]) for j in range(3)] for i in range(3)])
    G_ref = (s_d * np.linalg.norm(gd) + s_c * per_pos.sum()) / 2
    eta_ref = _eta(G_ref)
    assert G == pytest.approx(G_ref, rel=1e-12)
    assert eta == pytest.approx(eta_ref, rel=1e-12)
    np.testing.assert_allclose(
        updates["d"]["kernel"], -3.0 * eta_ref / 2 * s_d * gd / np.linalg.norm(gd), rtol=1e-12
    )
    want_c = -3.0 * eta_ref / 2 * s_c * gc / per_pos[:, :, None, None]
    np.testing.assert_allclose(updates["conv"]["kernel"], want_c, rtol=1e-12)
    # Each position's slice moves by exactly gain * eta / L * s in Frobenius norm.
    moved = np.linalg.norm(updates["conv"]["kernel"], axis=(2, 3))
    np.testing.assert_allclose(moved, 3.0 * eta_ref / 2 * s_c, rtol=1e-12)


def test_bias_moves_with_its_weight(x64):
    rng = np.random.default_rng(1)
    gw, gb = rng.normal(size=(5, 2)), rng.normal(size=2)
    params = {"l": {"kernel": np.zeros((5, 2)), "bias": np.zeros(2)}}
    updates, eta, G = _step(params, {"l": {"kernel": gw, "bias": gb}})
    s = math.sqrt(2 / 5)
    # The bias counts neither in L nor in G.
    assert G == pytest.approx(s * np.linalg.norm(gw), rel=1e-12)
    np.testing.assert_allclose(updates["l"]["bias"], -eta * s * gb / np.linalg.norm(gw), rtol=1e-12)


def test_conv_bias_uses_whole_kernel_norm(x64):
    rng = np.random.default_rng(2)
    gw, gb = rng.normal(size=(3, 3, 2, 4)), rng.normal(size=4)
    params = {"conv": {"kernel": np.zeros_like(gw), "bias": np.zeros(4)}}
    updates, eta, _ = _step(params, {"conv": {"kernel": gw, "bias": gb}})
    s = math.sqrt(4 / 2) / 3
    np.testing.assert_allclose(
        updates["conv"]["bias"], -eta * s * gb / np.linalg.norm(gw), rtol=1e-12
    )


def test_norm_layer_parameters_rule(x64):
    rng = np.random.default_rng(3)
    gw, gs, go = rng.normal(size=(4, 4)), rng.normal(size=4), rng.normal(size=4)
    params = {"l": {"kernel": np.zeros((4, 4))}, "ln": {"scale": np.ones(4), "bias": np.zeros(4)}}
    grads = {"l": {"kernel": gw}, "ln": {"scale": gs, "bias": go}}
    updates, eta, G = _step(params, grads)
    _, eta_alone, _ = _step({"l": params["l"]}, {"l": grads["l"]})
    assert eta == eta_alone  # Norm-layer parameters change neither L nor G.
    np.testing.assert_allclose(updates["ln"]["scale"], -eta * gs / np.linalg.norm(gs), rtol=1e-12)
    np.testing.assert_allclose(updates["ln"]["bias"], -eta * go / np.linalg.norm(go), rtol=1e-12)


def test_stacked_weights_equal_separate_weights(x64):
    rng = np.random.default_rng(4)
    g = rng.normal(size=(3, 8, 4))
    gb = rng.normal(size=(3, 4))
    stacked = {"layers": {"kernel": g, "bias": gb}}
    roles = {"layers": {"kernel": agd_optax.dense(stack_axes=0), "bias": "bias"}}
    u_stacked, eta_stacked, _ = _step(jax.tree.map(np.zeros_like, stacked), stacked, roles=roles)
    separate = {f"l{i}": {"kernel": g[i], "bias": gb[i]} for i in range(3)}
    u_sep, eta_sep, _ = _step(jax.tree.map(np.zeros_like, separate), separate)
    assert eta_stacked == pytest.approx(eta_sep, rel=1e-12)
    for i in range(3):
        np.testing.assert_allclose(
            u_stacked["layers"]["kernel"][i], u_sep[f"l{i}"]["kernel"], rtol=1e-12
        )
        np.testing.assert_allclose(
            u_stacked["layers"]["bias"][i], u_sep[f"l{i}"]["bias"], rtol=1e-12
        )


def test_grouped_conv_scale_and_update(x64):
    rng = np.random.default_rng(5)
    g = rng.normal(size=(3, 3, 2, 8))  # 4 groups of 2 -> 2 channels: in = 8, out = 8
    params = {"c": {"kernel": np.zeros_like(g)}}
    roles = {"c": {"kernel": agd_optax.conv(groups=4)}}
    updates, eta, G = _step(params, {"c": {"kernel": g}}, roles=roles)
    s = math.sqrt(8 / 8) / 3
    per_pos = np.linalg.norm(g, axis=(2, 3))
    assert G == pytest.approx(s * per_pos.sum(), rel=1e-12)
    np.testing.assert_allclose(
        updates["c"]["kernel"], -eta * s * g / per_pos[:, :, None, None], rtol=1e-12
    )


def test_attention_kernel_is_one_matrix(x64):
    rng = np.random.default_rng(6)
    g = rng.normal(size=(16, 2, 8))
    params = {"query": {"kernel": np.zeros_like(g)}}
    updates, eta, G = _step(params, {"query": {"kernel": g}})
    assert G == pytest.approx(np.linalg.norm(g), rel=1e-12)  # s = sqrt(16 / 16) = 1
    np.testing.assert_allclose(updates["query"]["kernel"], -eta * g / np.linalg.norm(g), rtol=1e-12)


def test_gain_schedule():
    params = {"l": {"kernel": jnp.ones((2, 2))}}
    tx = agd_optax.agd(gain=optax.linear_schedule(1.0, 3.0, 2))
    state = tx.init(params)
    sizes = []
    for _ in range(3):
        updates, state = tx.update(params, state)
        sizes.append(float(jnp.linalg.norm(updates["l"]["kernel"]) / optax.tree.get(state, "eta")))
    # u = gain * (eta / L) * s * g / |g|: |u| / eta = gain * s with s = 1 and L = 1.
    np.testing.assert_allclose(sizes, [1.0, 2.0, 3.0], rtol=1e-6)


class _BatchNormMLP(nnx.Module):
    def __init__(self, rngs):
        init = agd_optax.dense_init()
        self.l1 = nnx.Linear(10, 64, kernel_init=init, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.l2 = nnx.Linear(64, 64, kernel_init=init, rngs=rngs)
        self.ln = nnx.LayerNorm(64, rngs=rngs)
        self.l3 = nnx.Linear(64, 3, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        x = math.sqrt(2) * nnx.relu(self.bn(self.l1(x)))
        x = math.sqrt(2) * nnx.relu(self.ln(self.l2(x)))
        return self.l3(x)


def test_network_with_batchnorm_and_layernorm_trains():
    """Biases, BatchNorm and LayerNorm scale/offset all train under AGD's 1-D rules."""
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (256, 10))
    y = jnp.argmax(x[:, :3] + 0.5 * jnp.sin(3 * x[:, 3:6]), axis=-1)
    model = _BatchNormMLP(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, agd_optax.agd(), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(150)]
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    accuracy = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    assert accuracy > 0.9
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name in ("bn", "ln"):
        for leaf in ("scale", "bias"):
            assert not np.allclose(after[name][leaf], before[name][leaf]), (
                f"{name}/{leaf} did not move"
            )


def test_clipping_before_agd_lowers_eta_and_keeps_the_direction():
    import optax

    params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
    grads = {"a": {"kernel": jnp.full((8, 4), 3.0)}, "b": {"kernel": jnp.full((4, 2), -2.0)}}
    plain = agd_optax.agd()
    clipped = optax.chain(optax.clip_by_global_norm(1.0), agd_optax.agd())
    u_plain, s_plain = plain.update(grads, plain.init(params), params)
    u_clip, s_clip = clipped.update(grads, clipped.init(params), params)
    eta_plain = float(optax.tree.get(s_plain, "eta"))
    eta_clip = float(optax.tree.get(s_clip, "eta"))
    assert float(optax.tree.get(s_clip, "G")) < float(optax.tree.get(s_plain, "G"))
    assert eta_clip < eta_plain
    # Each layer's direction is unchanged; every update shrinks by eta_clip / eta_plain.
    for k in ("a", "b"):
        ratio = u_clip[k]["kernel"] / u_plain[k]["kernel"]
        assert jnp.allclose(ratio, eta_clip / eta_plain, rtol=1e-5)
