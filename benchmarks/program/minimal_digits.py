"""The job of ``python -m benchmarks.train`` (no flags) as a minimal script, the yardstick of the
program's fixed costs: load scikit-learn's digits (the same split and normalisation), AGD's
initialisation, a bias-free 3-layer FCN of width 256 with sqrt(2)-ReLUs, ``agd()``, 40 epochs of
batch 128, test accuracy. No run folder, checkpoints, metrics or plot.
"""

import math
import time

t_start = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import agd_optax  # noqa: E402

digits = load_digits()
x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 64)
train_x, test_x, train_y, test_y = train_test_split(
    x, digits.target.astype(np.int32), test_size=360, stratify=digits.target, random_state=0
)
mean, std = train_x.mean(), train_x.std()
train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

init = agd_optax.dense_init()
rngs = nnx.Rngs(0)
layers = [nnx.Linear(a, b, use_bias=False, kernel_init=init, rngs=rngs)
          for a, b in ((64, 256), (256, 256), (256, 10))]  # fmt: skip
relu = lambda h: math.sqrt(2.0) * jax.nn.relu(h)  # noqa: E731
model = nnx.Sequential(layers[0], relu, layers[1], relu, layers[2])
optimizer = nnx.Optimizer(model, optax.chain(agd_optax.agd()), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))


rng = np.random.default_rng(0)
for _epoch in range(40):
    order = rng.permutation(len(train_x))
    for start in range(0, len(order) - 127, 128):
        idx = order[start : start + 128]
        train_step(model, optimizer, train_x[idx], train_y[idx])
accuracy = float(jnp.mean(jnp.argmax(model(test_x), -1) == test_y))
print(f"test accuracy {accuracy:.4f}, {time.perf_counter() - t_start:.1f} s")
