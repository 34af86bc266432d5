"""A run's state (model and optimizer) and its jitted train and eval steps: ``Trainer``.

The state is initialised by one jitted function for the whole tree: the model is built, AGD's
scaled orthogonal initialisation (and the weights an AGD rule re-reads) replaces Flax's inside
that function, so Flax's own draws for those weights are dead code XLA removes, and the optimizer
state is created beside it. The steps are module-level functions compiled ahead of time once per
process for each model, setting and batch shape (``_compiled``), so a suite of runs in one process
compiles each distinct step once; the seconds spent compiling (and running each newly compiled
train step for the first time) are counted apart from training.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agd_optax
from benchmarks import parallel, rules
from benchmarks.config import Config
from benchmarks.models import make_model
from benchmarks.task import Task, per_example_loss


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a step depends on besides the state and the batch (static, hashable)."""

    loss: str
    skip_nonfinite: bool
    logged: tuple[str, ...]  # Optimizer-state fields returned as metrics every step.
    dtype: str  # Compute dtype of the forward pass (parameters stay float32).
    eval_params: Callable[[Any, Any], Any] | None  # Schedule-free: the point evaluated.


def compute_dtype(config: Config) -> str:
    """bfloat16 compute (float32 parameters) on accelerators, float32 on CPU, unless configured."""
    if config.compute_dtype is not None:
        return config.compute_dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _pure(tree: Any) -> Any:
    """The same tree with every nnx.Variable replaced by its array."""
    # get_value(), not v[...]: optax.partition's masked leaves hold empty nodes, not arrays.
    return jax.tree.map(
        lambda v: v.get_value(), tree, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (one boolean)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(_pure(tree))
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _forward(model: nnx.Module, x: jax.Array, dtype: str) -> jax.Array:
    """Float32 logits; with a low-precision compute dtype, the parameters are cast for the
    forward pass only (they stay float32 in the state, and so do BatchNorm statistics)."""
    if dtype == "float32":
        return model(x).astype(jnp.float32)
    low_dtype = jnp.dtype(dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cast = lambda p: p.astype(low_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p  # noqa: E731
    low = nnx.merge(graphdef, jax.tree.map(cast, params), rest)
    logits = low(x.astype(low_dtype)).astype(jnp.float32)
    new_rest = nnx.state(low, nnx.Not(nnx.Param))
    nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest))
    return logits


def metric_names(settings: Settings) -> tuple[str, ...]:
    """The names of the values a train step returns, in their order (``Trainer.train_step``)."""
    return ("loss", "accuracy", "finite", "counted", *settings.logged)


def _train_step(leaves, x, y, *, graphdef, treedef, settings: Settings, shardings):
    """One step on the state's leaves (flat, so that calling it costs the host no tree of
    Variables); returns the new leaves and the step's ``metric_names`` as one float32 vector."""
    model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    def loss_fn(model):
        logits = _forward(model, x, settings.dtype)
        return jnp.mean(per_example_loss(settings.loss, logits, y)), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    # A step is finite when its loss and the state it leaves are; with skip_nonfinite, a step of
    # non-finite gradients is skipped (its loss left out of the mean), not an error.
    loss_finite = jnp.isfinite(loss)
    finite = _all_finite(nnx.state((model, optimizer)))
    if not settings.skip_nonfinite:
        finite = finite & loss_finite
    metrics = [
        jnp.where(loss_finite, loss, 0.0),
        jnp.mean(jnp.argmax(logits, -1) == y),
        finite,
        loss_finite,
    ]
    for name in settings.logged:  # A field of several values is logged as their sum.
        metrics.append(jnp.sum(optax.tree.get(_pure(optimizer.opt_state), name)))
    new_leaves = jax.tree.leaves(nnx.state((model, optimizer)))
    new_leaves = jax.lax.with_sharding_constraint(new_leaves, list(shardings))
    return new_leaves, jnp.stack([jnp.asarray(m, jnp.float32) for m in metrics])


def _eval_step(state, x, y, mask, *, graphdef, settings: Settings):
    model, optimizer = nnx.merge(graphdef, state)
    if settings.eval_params is not None:
        params = _pure(nnx.state(model, nnx.Param))
        nnx.update(model, settings.eval_params(_pure(optimizer.opt_state), params))
    logits = _forward(model, x, settings.dtype)
    losses = per_example_loss(settings.loss, logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    if losses.ndim > 1:  # A sequence per example: its mean over positions.
        losses = losses.reshape(losses.shape[0], -1).mean(axis=1)
        correct = correct.reshape(correct.shape[0], -1).mean(axis=1)
    return {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


_STATICS = ("graphdef", "treedef", "settings", "shardings")
_TRAIN = jax.jit(_train_step, static_argnames=_STATICS, donate_argnums=0)
_EVAL = jax.jit(_eval_step, static_argnames=("graphdef", "settings"))
_COMPILED: dict[Any, Any] = {}  # (step, statics, argument types) -> compiled executable.
_INITS: dict[str, Any] = {}  # Run key -> the jitted initialisation of that model and optimizer.


def _signature(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def _compiled(step, args: tuple, statics: dict[str, Any]) -> tuple[Any, float]:
    """``step`` compiled for ``args``' types (once per process), and the seconds it took now."""
    key = (step, tuple(sorted(statics.items(), key=lambda kv: kv[0])), _signature(args))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    _COMPILED[key] = step.lower(*args, **statics).compile()
    return _COMPILED[key], time.perf_counter() - t0


def model_builder(config: Config, task: Task, agd_init: bool) -> Callable[[Any], nnx.Module]:
    """A function of the seed (an int or a traced one) building ``config``'s model, with Flax's
    initialisers, or for a model that initialises itself (``Task.initialises_itself``) AGD's way
    when ``agd_init``."""
    num_classes, input_shape, options = task.model_spec()
    options = options | {name: getattr(config, name) for name in config.architecture.options}
    if task.initialises_itself:
        options["init"] = "agd" if agd_init else "gpt2"
    depth = config.depth if config.architecture.fixed_depth is None else None
    return lambda seed: make_model(
        config.arch,
        num_classes=num_classes,
        input_shape=input_shape,
        depth=depth,
        width=config.width,
        bias=config.bias,
        rngs=nnx.Rngs(jax.random.key(seed)),
        **options,
    )


def agd_initialization(
    config: Config, task: Task, agd_init: bool, roles: Callable[[], Any]
) -> Callable[[Any], Any] | None:
    """``(params, seed) -> params``: AGD's scaled orthogonal initialisation by the model's
    ``roles`` (with ``agd_init``, unless the model initialises itself), then, for AGD, the
    weights whose role its rule changes initialised by their new role; None when nothing
    changes."""
    reinit = agd_init and not task.initialises_itself
    by_rule = config.optimizer == "agd" and rules.changed_by_rule(config.agd_rule, roles())
    if not (reinit or by_rule):
        return None

    def initialize(params, seed):
        seed = jax.random.key(seed)
        if reinit:
            params = agd_optax.reinitialize(jax.random.fold_in(seed, 1), params, roles())
        if by_rule:
            key = jax.random.fold_in(seed, 3)
            params = rules.reinitialize_for_rule(config.agd_rule, params, key, roles())
        return params

    return initialize


class Trainer:
    """The split model and optimizer state, placed on the mesh, and the compiled steps.

    Parameters and optimizer state are replicated over the mesh's data axis (data parallel), or,
    with ``config.shard_params``, split along one axis of each leaf (FSDP style). Batches are
    split over the data axis; under ``jit`` XLA inserts the cross-device reductions, so AGD's
    norms, G and eta, and BatchNorm's batch statistics, are those of the global batch.
    """

    def __init__(self, config: Config, spec, tx, build_model, initialize, mesh, key: str = ""):
        """``build_model``: ``model_builder``'s function; ``initialize``: ``agd_initialization``'s
        (or None). Model and optimizer state are made by one jitted function of the seed, on the
        mesh; runs of one process with the same ``key`` (the same model, optimizer and settings
        but the seed) share it and the compiled steps."""
        self.mesh = mesh
        self.settings = Settings(
            config.loss, bool(config.skip_nonfinite), spec.logged, compute_dtype(config),
            spec.eval_params,
        )  # fmt: skip

        def build(seed):
            model = build_model(seed)
            if initialize is not None:
                nnx.update(model, initialize(nnx.state(model, nnx.Param), seed))
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        abstract = nnx.eval_shape(lambda: build(0))
        self.graphdef_train, abstract_state = nnx.split(abstract)
        abstract[0].eval()
        self.graphdef_eval, _ = nnx.split(abstract)
        if config.shard_params:
            sharding = parallel.fsdp_shardings(mesh, abstract_state)
        else:
            sharding = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
        self.shardings = tuple(jax.tree.leaves(sharding))
        t0 = time.perf_counter()
        init = _INITS.get(key) if key else None
        if init is None:
            init = jax.jit(lambda seed: nnx.split(build(seed))[1])
            if key:
                _INITS[key] = init
        self.metric_names = metric_names(self.settings)
        self._host_batches = parallel.one_device(mesh)  # Host batches passed to the step's call.
        # Computed once on one device, then placed (replicated or split) on the mesh.
        state = jax.device_put(init(np.uint32(config.seed)), sharding)
        self._leaves, self._treedef = jax.tree.flatten(state)
        jax.block_until_ready(self._leaves)
        self.init_time_s = time.perf_counter() - t0  # Its compilation included.
        # The steps' compilations, counted as they happen, with the first run of each compiled
        # train step (XLA sets a new program up on its first run: on CPU that run can take as long
        # as a hundred steps); those steps are counted in warmup_steps, not as steady training.
        self.compile_time_s = 0.0
        self.warmup_steps = 0
        self._train_steps: dict[Any, Any] = {}  # Batch types -> compiled step.

    @property
    def state(self) -> Any:
        """Model and optimizer state (an ``nnx.State``); kept as its flat leaves between steps."""
        return jax.tree.unflatten(self._treedef, self._leaves)

    @state.setter
    def state(self, state: Any) -> None:
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self._treedef:
            raise ValueError(
                f"a state of another structure than the run's model and optimizer: {treedef}"
            )
        self._leaves = leaves

    def train_step(self, x: np.ndarray | jax.Array, y: np.ndarray | jax.Array) -> jax.Array:
        """One step on a global batch: this process's part of it on the host (NumPy), or the
        whole of it already on the devices (``parallel.shard_batch``). Returns the step's values
        named by ``metric_names``, as one vector on the devices.

        On a mesh of one device the host arrays go to the device within the step's own call (the
        cheapest way on the host); on several devices they are placed first
        (``parallel.shard_batch``), then the step runs."""
        if not (self._host_batches or isinstance(x, jax.Array)):
            x, y = parallel.shard_batch(self.mesh, x, y)
        step = self._train_steps.get((x.shape, x.dtype, y.shape, y.dtype))  # State: fixed types.
        if step is None:  # Compiled, then run once to its end: warm-up, apart from training.
            t0 = time.perf_counter()
            step = self._compile_train_step(x, y)
            self._leaves, metrics = step(self._leaves, x, y)
            jax.block_until_ready(metrics)
            self.compile_time_s += time.perf_counter() - t0
            self.warmup_steps += 1
            return metrics
        self._leaves, metrics = step(self._leaves, x, y)
        return metrics

    def _compile_train_step(self, x: np.ndarray | jax.Array, y: np.ndarray | jax.Array) -> Any:
        """The train step compiled for global batches of ``x``'s and ``y``'s types, split over
        the mesh's data axis (host arrays of those types are accepted too)."""
        key = (x.shape, x.dtype, y.shape, y.dtype)
        if not isinstance(x, jax.Array):
            x, y = parallel.shard_batch(self.mesh, x, y)
        statics = dict(
            graphdef=self.graphdef_train,
            treedef=self._treedef,
            settings=self.settings,
            shardings=self.shardings,
        )
        step, _ = _compiled(_TRAIN, (self._leaves, x, y), statics)
        self._train_steps[key] = step
        return step

    def evaluate(self, task: Task) -> dict[str, float]:
        """Loss and accuracy over the task's evaluation set (host floats)."""
        outs = []
        statics = dict(graphdef=self.graphdef_eval, settings=self.settings)
        for x, y, mask in task.eval_batches(parallel.data_size(self.mesh)):
            args = (self.state, *parallel.shard_batch(self.mesh, x, y, mask))
            step, seconds = _compiled(_EVAL, args, statics)
            self.compile_time_s += seconds
            outs.append(step(*args))
        totals = {k: float(np.sum([o[k] for o in jax.device_get(outs)])) for k in outs[0]}
        count = totals["count"]
        return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}

    def model(self) -> nnx.Module:
        """The trained model, in eval mode."""
        model, _ = nnx.merge(self.graphdef_eval, self.state)
        return model

    def opt_value(self, name: str) -> jax.Array | None:
        """A field of the optimizer state (``eta``, ``total_notfinite``), or None."""
        _, optimizer = nnx.merge(self.graphdef_train, self.state)
        found = optax.tree.get(_pure(optimizer.opt_state), name, None)
        return None if found is None else np.asarray(found)

    def params(self) -> Any:
        model, _ = nnx.merge(self.graphdef_train, self.state)
        return nnx.state(model, nnx.Param)

    def state_types(self) -> list[str]:
        """The optimizer state's node types, outermost first (``ScaleByAGDState``,
        ``PartitionState``, ...): what the run's transformation was built from."""
        _, optimizer = nnx.merge(self.graphdef_train, self.state)
        names: list[str] = []

        def walk(x: Any) -> None:
            if isinstance(x, tuple) and hasattr(x, "_fields"):
                names.append(type(x).__name__)
            if isinstance(x, list | tuple):
                for v in x:
                    walk(v)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)

        walk(_pure(optimizer.opt_state))
        return names


def describe_roles(roles: Any) -> dict[str, str]:
    """``path -> role`` in words (``dense in (-2,) out (-1,)``), as summary.json records them."""
    from agd_optax._paths import path_to_keys, path_to_str

    leaves = jax.tree_util.tree_flatten_with_path(
        roles, is_leaf=lambda x: isinstance(x, agd_optax.Role)
    )[0]
    out = {}
    for path, role in leaves:
        words = [role.kind]
        if role.in_axes or role.out_axes:
            words.append(f"in {role.in_axes} out {role.out_axes}")
        if role.stack_axes:
            words.append(f"stack {role.stack_axes}")
        out[path_to_str(path_to_keys(path))] = " ".join(words)
    return out
