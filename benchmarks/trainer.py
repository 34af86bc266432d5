"""The model, the optimizer and the jitted train and eval steps (``Trainer``)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import agd_optax
from benchmarks import optimizers, parallel, rules
from benchmarks.config import Config
from benchmarks.input_pipeline import eval_batches
from benchmarks.models import ALIASES, ARCHITECTURES, make_model

# Losses.


def per_example_loss(kind: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``mse``: the paper's square loss against one-hot targets scaled by sqrt(classes), averaged
    over classes; ``xent``: softmax cross-entropy. Both computed in float32."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    if kind == "mse":
        target = jax.nn.one_hot(labels, num_classes) * math.sqrt(num_classes)
        return jnp.mean(jnp.square(logits - target), axis=-1)
    if kind == "xent":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    raise ValueError(f"unknown loss {kind!r}; expected 'mse' or 'xent'")


# --------------------------------------------------------------------------------------------------
# Model and optimizer.


def build_model(config: Config, data) -> nnx.Module:
    """The model of ``config``; AGD runs (``Optimizer.agd_init``) start from AGD's scaled
    orthogonal initialisation, baselines from Flax's usual initialisers (the transformer: GPT-2's).
    The architecture's own options (``Architecture.options``) are the same-named Config fields."""
    arch = ARCHITECTURES[ALIASES.get(config.arch, config.arch)]
    agd_init = optimizers.get(config.optimizer).agd_init
    options = {name: getattr(config, name) for name in arch.options}
    if arch.task == "language":  # Initialised by the model itself, AGD's way or GPT-2's.
        num_classes, input_shape = data.vocab_size, (config.context,)
        options["init"] = "agd" if agd_init else "gpt2"
    else:
        num_classes, input_shape = data.num_classes, data.input_shape
    model = make_model(
        config.arch,
        num_classes=num_classes,
        input_shape=input_shape,
        depth=config.depth if arch.fixed_depth is None else None,
        width=config.width,
        bias=config.bias,
        rngs=nnx.Rngs(config.seed),
        **options,
    )
    if agd_init and arch.task != "language":
        params = nnx.state(model, nnx.Param)
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        nnx.update(model, agd_optax.reinitialize(key, params, agd_optax.nnx_roles(model)))
    if config.optimizer == "agd":  # Weights whose role the rule changes, initialised by it.
        key = jax.random.fold_in(jax.random.key(config.seed), 3)
        rules.reinitialize_for_rule(config.agd_rule, config.arch, model, key, config.context)
    return model


def agd_roles(config: Config, model: nnx.Module) -> Any:
    """AGD's roles for ``model``: read off its forward pass for language models (stacked blocks
    included), off its module types otherwise."""
    if ARCHITECTURES[ALIASES.get(config.arch, config.arch)].task == "language":
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens = jnp.zeros((1, config.context), jnp.int32)
        forward = lambda p, r, x: nnx.merge(graphdef, p, r)(x)  # noqa: E731
        return agd_optax.trace_roles(forward, params, rest, tokens)
    return agd_optax.nnx_roles(model)


def make_tx(
    config: Config, model: nnx.Module | None, total_steps: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optax transformation of ``config.optimizer`` (``optimizers.OPTIMIZERS``), with the
    configured learning-rate schedule for optimizers that take a learning rate."""
    if config.optimizer == "agd" and config.agd_rule != "library":  # Its 1-D or embedding rule.
        if model is None:
            raise ValueError(f"agd_rule {config.agd_rule!r} needs the model")
        return rules.agd_transformation(
            config.agd_rule, config.gain, config.arch, model, config.context
        )
    spec = optimizers.get(config.optimizer)
    lr = None
    if spec.takes_lr:
        peak = spec.default_lr if config.lr is None else config.lr
        warmup = int(config.warmup_epochs * steps_per_epoch)
        lr = optimizers.learning_rate(peak, config.schedule, warmup, total_steps)
    hyper = optimizers.Hyper(
        lr=lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        gain=config.gain,
        options=optimizers.resolve_options(config.optimizer, config.optimizer_options),
        roles=None if model is None else (lambda: agd_roles(config, model)),
        total_steps=total_steps,
    )
    return spec.build(hyper)


def _pure(tree: Any) -> Any:
    """The same tree with every nnx.Variable replaced by its array."""
    # get_value(), not v[...]: optax.partition's masked leaves hold empty nodes, not arrays.
    return jax.tree.map(
        lambda v: v.get_value(), tree, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def _opt_scalar(opt_state: Any, name: str, optimizer: str) -> jax.Array:
    """An optimizer-state field (AGD's eta) as a float32 array."""
    found = optax.tree.get(_pure(opt_state), name, None)
    if found is None:
        raise ValueError(f"optimizer {optimizer!r} logs {name!r}, but its state has no such field")
    return jnp.asarray(found, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Steps.


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (one boolean)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(_pure(tree))
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _cast_floats(tree: Any, dtype) -> Any:
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def compute_dtype(config: Config):
    """bfloat16 compute (float32 parameters) on accelerators, float32 on CPU, unless configured."""
    if config.compute_dtype is not None:
        return jnp.dtype(config.compute_dtype)
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


class Trainer:
    """Holds the split model and optimizer state and the jitted train and eval steps.

    Parameters and optimizer state are replicated over the mesh's data axis (data parallel), or,
    with ``config.shard_params``, split along one axis of each leaf (FSDP style). Batches are
    split over the data axis; under ``jit`` XLA inserts the cross-device reductions, so AGD's
    norms, G and eta, and BatchNorm's batch statistics, are those of the global batch.
    """

    def __init__(self, config: Config, model: nnx.Module, tx, mesh):
        self.config = config
        self.mesh = mesh
        self.dtype = compute_dtype(config)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        model.eval()
        self.graphdef_eval, _ = nnx.split((model, optimizer))
        model.train()
        self.graphdef_train, state = nnx.split((model, optimizer))
        if config.shard_params:
            self.state_sharding = parallel.fsdp_shardings(mesh, state)
        else:
            self.state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
        # Copies: some optimizers' states alias the parameters (cocob), which donation forbids.
        self.state = jax.tree.map(jnp.copy, jax.device_put(state, self.state_sharding))
        self.spec = optimizers.get(config.optimizer)
        self._train_step = jax.jit(self._train_step_impl, donate_argnums=0)
        self._eval_step = jax.jit(self._eval_step_impl)

    def _forward(self, model: nnx.Module, x: jax.Array) -> jax.Array:
        """Float32 logits; with a low-precision compute dtype, the parameters are cast for the
        forward pass only (they stay float32 in the state, and so do BatchNorm statistics)."""
        if self.dtype == jnp.float32:
            return model(x).astype(jnp.float32)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        low = nnx.merge(graphdef, _cast_floats(params, self.dtype), rest)
        logits = low(x.astype(self.dtype)).astype(jnp.float32)
        new_rest = nnx.state(low, nnx.Not(nnx.Param))
        nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest))
        return logits

    def _train_step_impl(self, state, x, y):
        model, optimizer = nnx.merge(self.graphdef_train, state)

        def loss_fn(model):
            logits = self._forward(model, x)
            return jnp.mean(per_example_loss(self.config.loss, logits, y)), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        # A step is finite when its loss and the state it leaves are; with skip_nonfinite, a
        # step of non-finite gradients is skipped (its loss left out of the mean), not an error.
        loss_finite = jnp.isfinite(loss)
        finite = _all_finite(nnx.state((model, optimizer)))
        if not self.config.skip_nonfinite:
            finite = finite & loss_finite
        metrics = {
            "loss": jnp.where(loss_finite, loss, 0.0),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "finite": finite,
            "counted": loss_finite.astype(jnp.float32),
        }
        for name in self.spec.logged:
            metrics[name] = _opt_scalar(optimizer.opt_state, name, self.config.optimizer)
        new_state = jax.lax.with_sharding_constraint(
            nnx.state((model, optimizer)), self.state_sharding
        )
        return new_state, metrics

    def _eval_step_impl(self, state, x, y, mask):
        model, optimizer = nnx.merge(self.graphdef_eval, state)
        if self.spec.eval_params is not None:
            params = _pure(nnx.state(model, nnx.Param))
            nnx.update(model, self.spec.eval_params(_pure(optimizer.opt_state), params))
        logits = self._forward(model, x)
        losses = per_example_loss(self.config.loss, logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        if losses.ndim > 1:  # A sequence per example: its mean over positions.
            losses = losses.reshape(losses.shape[0], -1).mean(axis=1)
            correct = correct.reshape(correct.shape[0], -1).mean(axis=1)
        return {
            "loss": jnp.sum(losses * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    def train_step(self, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """One step on a global batch already on the devices (``parallel.shard_batch``)."""
        self.state, metrics = self._train_step(self.state, x, y)
        return metrics

    def evaluate(self, data, config: Config) -> dict[str, float]:
        totals = None
        for x, y, mask in eval_batches(data, config, parallel.data_size(self.mesh)):
            x, y, mask = parallel.shard_batch(self.mesh, x, y, mask)
            out = self._eval_step(self.state, x, y, mask)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        count = float(totals["count"])
        return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}

    def model(self) -> nnx.Module:
        """The trained model, in eval mode."""
        model, _ = nnx.merge(self.graphdef_eval, self.state)
        return model

    def opt_value(self, name: str) -> jax.Array | None:
        """A field of the optimizer state (``eta``, ``total_notfinite``), or None."""
        _, optimizer = nnx.merge(self.graphdef_train, self.state)
        found = optax.tree.get(_pure(optimizer.opt_state), name, None)
        return None if found is None else jnp.asarray(found)

    def params(self) -> Any:
        model, _ = nnx.merge(self.graphdef_train, self.state)
        return nnx.state(model, nnx.Param)
