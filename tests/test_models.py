"""Tests of the benchmark models (benchmarks.models): tiny widths, batch 2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.models import (
    ARCHS,
    CNN1D,
    FCN,
    VGG,
    make_model,
    scaled_relu,
)
from benchmarks.models.layers import batch_norm


def fast_init(key, shape, dtype=jnp.float32):
    """Scaled Gaussian kernels from NumPy: unlike Flax's default init, nothing to compile
    per kernel shape (which costs ~1 s per shape on a small CPU)."""
    fan_in = int(np.prod(shape[:-1]))
    rng = np.random.default_rng(int(np.prod(shape)) + len(shape))
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)


F = dict(kernel_init=fast_init)


def param_paths(model) -> set[str]:
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count(model, kind=nnx.Param) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, kind)))


def abstract_output_shape(model, input_shape) -> tuple[int, ...]:
    """Output shape of a (possibly abstract, eval_shape-built) model, without computing."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def test_scaled_relu():
    x = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(scaled_relu(x), [0.0, 0.0, 3.0 * math.sqrt(2)], rtol=1e-6)


def test_fcn_layers_and_forward_match_manual():
    model = FCN(8 * 8 * 1, width=16, depth=4, num_classes=10, rngs=nnx.Rngs(0), **F)
    assert len(model.layers) == 4
    shapes = [tuple(layer.kernel.shape) for layer in model.layers]
    assert shapes == [(64, 16), (16, 16), (16, 16), (16, 10)]
    assert param_paths(model) == {f"layers/{i}/kernel" for i in range(4)}
    x = images((2, 8, 8, 1))
    h = x.reshape(2, -1)
    for layer in model.layers[:-1]:
        h = math.sqrt(2) * jnp.maximum(h @ layer.kernel[...], 0.0)
    expected = h @ model.layers[-1].kernel[...]
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fcn_depth_two_and_validation():
    model = FCN(5, width=7, depth=2, num_classes=3, rngs=nnx.Rngs(0))
    assert model(jnp.ones((2, 5))).shape == (2, 3)
    with pytest.raises(ValueError, match="depth >= 2"):
        FCN(5, width=7, depth=1, num_classes=3, rngs=nnx.Rngs(0))


def test_bias_flag_adds_bias_and_bn_affine():
    no_bias = VGG((4, "M", 8), num_classes=3, input_shape=(8, 8, 3), rngs=nnx.Rngs(0), **F)
    assert param_paths(no_bias) == {"convs/0/kernel", "convs/1/kernel", "classifier/kernel"}
    with_bias = VGG(
        (4, "M", 8), num_classes=3, input_shape=(8, 8, 3), bias=True, rngs=nnx.Rngs(0), **F
    )
    assert param_paths(with_bias) == {
        "convs/0/kernel",
        "convs/0/bias",
        "convs/1/kernel",
        "convs/1/bias",
        "norms/0/scale",
        "norms/0/bias",
        "norms/1/scale",
        "norms/1/bias",
        "classifier/kernel",
        "classifier/bias",
    }
    fcn = make_model(
        "fcn", num_classes=3, input_shape=(4,), depth=3, width=5, bias=True, rngs=nnx.Rngs(0), **F
    )
    assert param_paths(fcn) == {f"layers/{i}/{n}" for i in range(3) for n in ("kernel", "bias")}
    # BatchNorm running statistics exist either way, but are not parameters.
    assert count(no_bias, nnx.BatchStat) == count(with_bias, nnx.BatchStat) == 2 * (4 + 8)


def test_kernel_init_is_used_everywhere():
    def init(key, shape, dtype=jnp.float32):
        return jnp.full(shape, 0.5, dtype)

    for arch, shape in [("fcn", (6,)), ("vgg16", (32, 32, 3)), ("resnet18", (8, 8, 3))]:
        model = make_model(
            arch,
            num_classes=3,
            input_shape=shape,
            depth=3 if arch == "fcn" else None,
            width=4,
            rngs=nnx.Rngs(0),
            kernel_init=init,
        )
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert leaves and all(bool(jnp.all(leaf == 0.5)) for leaf in leaves), arch


def test_vgg_tiny_cfg_shapes():
    model = VGG((4, 4, "M", 8, "M"), num_classes=5, input_shape=(8, 8, 3), rngs=nnx.Rngs(0), **F)
    assert model.classifier.kernel.shape == (2 * 2 * 8, 5)
    assert model(images((2, 8, 8, 3))).shape == (2, 5)
    with pytest.raises(ValueError, match="too many pools"):
        VGG((4, "M", "M"), num_classes=5, input_shape=(2, 2, 3), rngs=nnx.Rngs(0), **F)


def test_vgg16_small_width_forward():
    model = make_model(
        "vgg", num_classes=10, input_shape=(32, 32, 3), width=4, rngs=nnx.Rngs(0), **F
    )
    assert len(model.convs) == 13
    assert model.classifier.kernel.shape == (32, 10)  # 512 * 4 / 64 channels at 1x1
    assert model(images((2, 32, 32, 3))).shape == (2, 10)


def test_vgg16_full_size_param_count():
    model = nnx.eval_shape(
        lambda: make_model("vgg16", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    )
    # 14,728,266 with conv biases (4,224), BN affine (2 * 4,224) and fc bias (10).
    assert count(model) == 14_728_266 - 4_224 - 2 * 4_224 - 10 == 14_715_584
    assert model.classifier.kernel.shape == (512, 10)
    assert abstract_output_shape(model, (32, 32, 3)) == (2, 10)


def test_resnet18_full_size_param_count():
    build = lambda bias: make_model(
        "resnet18", num_classes=10, input_shape=(32, 32, 3), bias=bias, rngs=nnx.Rngs(0)
    )
    model = nnx.eval_shape(lambda: build(False))
    # The usual CIFAR ResNet-18 count 11,173,962 includes BN affine parameters and the
    # fc bias (its convs have no bias). Its BatchNorms have 4,800 channels in total
    # (64 stem + 4*64 + 4*128 + 128 + 4*256 + 256 + 4*512 + 512 shortcut), so without
    # affine BN and fc bias: 11,173,962 - 2 * 4,800 - 10 = 11,164,352.
    assert count(model) == 11_164_352
    assert count(model, nnx.BatchStat) == 2 * 4_800
    assert abstract_output_shape(model, (32, 32, 3)) == (2, 10)
    # bias=True adds BN affine + fc bias + one bias per conv output channel (also 4,800).
    assert count(nnx.eval_shape(lambda: build(True))) == 11_173_962 + 4_800


def test_resnet50_full_size_param_count():
    build = lambda bias: make_model(
        "resnet50", num_classes=1000, input_shape=(224, 224, 3), bias=bias, rngs=nnx.Rngs(0)
    )
    model = nnx.eval_shape(lambda: build(False))
    # torchvision's 25,557,032 includes BN affine (2 * 26,560) and the fc bias (1,000).
    assert count(model) == 25_557_032 - 2 * 26_560 - 1_000 == 25_502_912
    assert count(model, nnx.BatchStat) == 2 * 26_560
    assert abstract_output_shape(model, (224, 224, 3)) == (2, 1000)
    assert count(nnx.eval_shape(lambda: build(True))) == 25_557_032 + 26_560


@pytest.mark.parametrize(
    "arch, input_shape",
    [("resnet18", (16, 16, 3)), ("preact_resnet18", (16, 16, 3)), ("resnet50", (16, 16, 3))],
)
def test_resnet_tiny_forward(arch, input_shape):
    model = make_model(arch, num_classes=7, input_shape=input_shape, width=2, rngs=nnx.Rngs(0), **F)
    out = model(images((2, *input_shape)))
    assert out.shape == (2, 7)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_resnet_structure():
    r18 = make_model(
        "resnet18", num_classes=10, input_shape=(32, 32, 3), width=2, rngs=nnx.Rngs(0), **F
    )
    assert [len(stage) for stage in r18.stages] == [2, 2, 2, 2]
    assert r18.stem_conv.kernel.shape == (3, 3, 3, 2)
    assert r18.stages[0][0].shortcut_conv is None
    assert r18.stages[1][0].shortcut_conv.kernel.shape == (1, 1, 2, 4)
    assert r18.fc.kernel.shape == (16, 10)
    r50 = make_model(
        "resnet50", num_classes=10, input_shape=(32, 32, 3), width=2, rngs=nnx.Rngs(0), **F
    )
    assert [len(stage) for stage in r50.stages] == [3, 4, 6, 3]
    assert r50.stem_conv.kernel.shape == (7, 7, 3, 2)
    assert r50.stages[0][0].shortcut_conv.kernel.shape == (1, 1, 2, 8)  # expansion 4
    assert r50.fc.kernel.shape == (16 * 4, 10)


def test_batchnorm_momentum_epsilon_and_no_affine():
    bn = batch_norm(3, bias=False, rngs=nnx.Rngs(0))
    assert bn.scale is None and bn.bias is None
    x = np.asarray(images((16, 3), seed=1)) * 2.0 + 1.0
    y = bn(jnp.asarray(x))
    np.testing.assert_allclose(bn.mean[...], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x.var(0), rtol=1e-5)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-5)


def test_batchnorm_train_vs_eval_mode():
    model = make_model(
        "resnet18", num_classes=4, input_shape=(8, 8, 3), width=2, rngs=nnx.Rngs(0), **F
    )
    x = images((2, 8, 8, 3))
    snapshot = lambda: jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    before = snapshot()
    model.train()
    train_out = model(x)
    after_train = snapshot()
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after_train)
    assert all(jax.tree.leaves(changed))  # every BN updated its running stats
    # Training mode normalises with batch statistics: a sample's output depends on the batch.
    assert not np.allclose(model(x[:1]), train_out[:1], atol=1e-4)

    model.eval()
    stats = snapshot()
    eval_out = model(x)
    np.testing.assert_allclose(model(x[:1]), eval_out[:1], rtol=1e-4, atol=1e-5)
    unchanged = jax.tree.map(lambda a, b: bool(np.all(a == b)), stats, snapshot())
    assert all(jax.tree.leaves(unchanged))


def test_split_merge_and_jit_roundtrip():
    model = make_model(
        "resnet18", num_classes=3, input_shape=(8, 8, 3), width=2, rngs=nnx.Rngs(0), **F
    )
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = images((2, 8, 8, 3))

    @jax.jit
    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x)

    np.testing.assert_allclose(forward(params, rest, x), model(x), rtol=1e-5, atol=1e-5)


def test_cnn1d():
    model = make_model("cnn1d", num_classes=10, input_shape=(40, 1), width=4, rngs=nnx.Rngs(0), **F)
    assert isinstance(model, CNN1D) and len(model.convs) == 3
    assert model.classifier.kernel.shape == (5 * 4, 10)  # 40 -> 20 -> 10 -> 5
    assert model.convs[0].kernel.shape == (5, 1, 4)
    x = images((2, 40, 1))
    assert model(x).shape == (2, 10)
    np.testing.assert_allclose(model(x[..., 0]), model(x), rtol=1e-6)


def test_make_model_errors():
    kw = dict(num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown arch 'alexnet'"):
        make_model("alexnet", input_shape=(32, 32, 3), **kw)
    with pytest.raises(ValueError, match="fcn.*depth and width"):
        make_model("fcn", input_shape=(4,), width=8, **kw)
    with pytest.raises(ValueError, match="depth >= 2"):
        make_model("fcn", input_shape=(4,), depth=1, width=8, **kw)
    with pytest.raises(ValueError, match="'resnet18' has fixed depth 18; got depth=34"):
        make_model("resnet18", input_shape=(32, 32, 3), depth=34, **kw)
    with pytest.raises(ValueError, match="'vgg16' expects input_shape"):
        make_model("vgg16", input_shape=(32, 32), **kw)
    with pytest.raises(ValueError, match="width must be >= 1"):
        make_model("resnet50", input_shape=(32, 32, 3), width=0, **kw)
    assert set(ARCHS) == {
        "fcn",
        "cnn1d",
        "vgg16",
        "resnet18",
        "preact_resnet18",
        "resnet50",
        "transformer",
    }
