"""The networks of tests/data/agd_torch_reference.npz, written in JAX with Flax's weight layouts.

The reference was recorded from the official PyTorch AGD implementation; see tests/data/README.md.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

REFERENCE = str(pathlib.Path(__file__).parent / "data" / "agd_torch_reference.npz")
CASES = {
    "fcn_mse": ("fcn", "mse", 1.0),
    "fcn_xent_gain10": ("fcn", "xent", 10.0),
    "cnn_mse": ("cnn", "mse", 1.0),
}


def scaled_relu(x):
    return math.sqrt(2.0) * jax.nn.relu(x)


def to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch layout (out, in) / (out, in, kh, kw) to Flax (in, out) / (kh, kw, in, out)."""
    return w.T if w.ndim == 2 else np.transpose(w, (2, 3, 1, 0))


def to_torch(w: np.ndarray) -> np.ndarray:
    return w.T if w.ndim == 2 else np.transpose(w, (3, 2, 0, 1))


def fcn(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["kernel"]
        if i < n - 1:
            x = scaled_relu(x)
    return x


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _avg_pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def cnn(params, x):
    x = _avg_pool(scaled_relu(_conv(x, params["conv0"]["kernel"])))
    x = _avg_pool(scaled_relu(_conv(x, params["conv1"]["kernel"])))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch's C, H, W flatten order.
    return x @ params["layer2"]["kernel"]


def loss_fn(apply, loss, params, x, y, num_classes=10):
    out = apply(params, x)
    if loss == "mse":
        target = jax.nn.one_hot(y, num_classes, dtype=out.dtype) * math.sqrt(num_classes)
        return jnp.mean(jnp.square(out - target))
    logp = jax.nn.log_softmax(out)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def load_case(data, case):
    arch, loss, gain = CASES[case]
    n = len([k for k in data.files if k.startswith(f"{case}/W0_")])

    # Flax's names: a convolution's module is named as one, which is what names read it by.
    def name(i):
        return f"conv{i}" if data[f"{case}/W0_{i}"].ndim == 4 else f"layer{i}"

    params0 = {name(i): {"kernel": to_flax(data[f"{case}/W0_{i}"])} for i in range(n)}
    params1 = {name(i): {"kernel": to_flax(data[f"{case}/W1_{i}"])} for i in range(n)}
    x = data[f"{case}/X"]
    if arch == "cnn":
        x = np.transpose(x, (0, 2, 3, 1))  # N, C, H, W -> N, H, W, C
    apply = fcn if arch == "fcn" else cnn
    return dict(
        apply=apply,
        loss=loss,
        gain=gain,
        params0=params0,
        params1=params1,
        x=x,
        y=data[f"{case}/Y"],
        losses=data[f"{case}/loss"],
        etas=data[f"{case}/eta"],
    )
