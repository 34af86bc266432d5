"""train_and_evaluate: data, model, optimizer, mesh, jitted step, evaluation, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agd_optax
from benchmarks import parallel
from benchmarks.config import Config
from benchmarks.data import Dataset, ImageNetData, augment_cifar, load_dataset
from benchmarks.models import make_model
from benchmarks.optimizers import is_schedule_free, make_optimizer

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------------------------------
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
# Data.


def load_data(config: Config) -> Dataset | ImageNetData:
    options = {}
    if config.dataset == "imagenet":
        options = dict(image_size=config.image_size, num_workers=config.num_workers)
    data = load_dataset(
        config.dataset, config.data_dir, download=config.download, seed=config.seed, **options
    )
    if config.validation_split:
        if not isinstance(data, Dataset):
            raise ValueError(
                f"validation_split is for in-memory datasets; {config.dataset} is streamed from "
                "its folders (hold out a split of its train/ folder on disk instead)"
            )
        data = validation_split(data, config.validation_split)
    return data


def validation_split(data: Dataset, fraction: float) -> Dataset:
    """Hold out the last ``fraction`` of a fixed permutation of the training set as the test set,
    so hyperparameters are tuned without looking at the real test set."""
    order = np.random.default_rng(12345).permutation(data.num_train)
    n_val = max(1, int(round(fraction * data.num_train)))
    train, val = order[:-n_val], order[-n_val:]
    return dataclasses.replace(
        data,
        train_x=data.train_x[train],
        train_y=data.train_y[train],
        test_x=data.train_x[val],
        test_y=data.train_y[val],
    )


def _num_train(data) -> int:
    return data.num_train


def _num_test(data) -> int:
    return data.num_test if isinstance(data, Dataset) else data.num_val


def train_batches(
    data: Dataset | ImageNetData, config: Config, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's part of each global training batch of ``epoch``: deterministic given
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""
    bs = config.train_bs
    n_proc, proc = jax.process_count(), jax.process_index()
    if bs % n_proc:
        raise ValueError(f"train_bs {bs} is not divisible by the {n_proc} processes")
    local = bs // n_proc
    if isinstance(data, ImageNetData):  # Each process decodes only its own images.
        yield from data.train_loader(
            local, seed=config.seed, epoch=epoch, shard_index=proc, shard_count=n_proc
        )
        return
    order = np.random.default_rng([config.seed, epoch]).permutation(data.num_train)
    augment_rng = np.random.default_rng([config.seed, epoch, 1])
    cifar = config.dataset in ("cifar10", "cifar100") and config.augment
    for start in range(0, data.num_train - bs + 1, bs):
        idx = order[start : start + bs]
        x = data.train_x[idx]
        if cifar:  # Augment the whole global batch so every process count gives the same result.
            x = augment_cifar(augment_rng, x)
        yield (
            x[proc * local : (proc + 1) * local],
            data.train_y[idx][proc * local : (proc + 1) * local],
        )


def eval_batches(
    data: Dataset | ImageNetData, config: Config, multiple: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Test batches padded to a multiple of the data-parallel size, with a mask of real examples."""
    if isinstance(data, ImageNetData):
        source = data.eval_loader(config.test_bs)
    else:
        source = (
            (data.test_x[i : i + config.test_bs], data.test_y[i : i + config.test_bs])
            for i in range(0, data.num_test, config.test_bs)
        )
    n_proc, proc = jax.process_count(), jax.process_index()
    for x, y in source:
        n = len(y)
        size = -(-n // (multiple * n_proc)) * multiple * n_proc
        pad = size - n
        mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        local = size // n_proc
        sl = slice(proc * local, (proc + 1) * local)
        yield x[sl], y[sl], mask[sl]


# --------------------------------------------------------------------------------------------------
# Model and optimizer.


def build_model(config: Config, data) -> nnx.Module:
    """The model of ``config``; AGD runs start from AGD's scaled orthogonal initialisation,
    baselines from Flax's usual initialisers."""
    model = make_model(
        config.arch,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        depth=config.depth if config.arch in ("fcn", "cnn1d") else None,
        width=config.width,
        bias=config.bias,
        rngs=nnx.Rngs(config.seed),
    )
    if config.optimizer == "agd":
        params = nnx.state(model, nnx.Param)
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        nnx.update(model, agd_optax.reinitialize(key, params, agd_optax.nnx_roles(model)))
    return model


def make_tx(config: Config, model: nnx.Module, total_steps: int, steps_per_epoch: int):
    if config.optimizer == "agd":
        return agd_optax.agd(config.gain, roles=agd_optax.nnx_roles(model))
    return make_optimizer(config, total_steps, steps_per_epoch)


def _pure(tree: Any) -> Any:
    """The same tree with every nnx.Variable replaced by its array."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _opt_scalar(opt_state: Any, name: str) -> jax.Array | None:
    """An optimizer-state field (AGD's eta) as an array, or None if the optimizer has none."""
    found = optax.tree.get(_pure(opt_state), name, None)
    return None if found is None else jnp.asarray(found, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Steps.


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
        self.schedule_free = is_schedule_free(config)
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
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        eta = _opt_scalar(optimizer.opt_state, "eta")
        if eta is not None:
            metrics["eta"] = eta
        new_state = jax.lax.with_sharding_constraint(
            nnx.state((model, optimizer)), self.state_sharding
        )
        return new_state, metrics

    def _eval_step_impl(self, state, x, y, mask):
        model, optimizer = nnx.merge(self.graphdef_eval, state)
        if self.schedule_free:
            params = _pure(nnx.state(model, nnx.Param))
            nnx.update(
                model, optax.contrib.schedule_free_eval_params(_pure(optimizer.opt_state), params)
            )
        logits = self._forward(model, x)
        losses = per_example_loss(self.config.loss, logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
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

    def params(self) -> Any:
        model, _ = nnx.merge(self.graphdef_train, self.state)
        return nnx.state(model, nnx.Param)


# --------------------------------------------------------------------------------------------------
# Checkpoints and metrics.


def _checkpoint_manager(workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )


def save_checkpoint(manager, epoch: int, state: Any) -> None:
    import orbax.checkpoint as ocp

    leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state))}
    manager.save(epoch, args=ocp.args.StandardSave(leaves))
    manager.wait_until_finished()


def restore_checkpoint(manager, state: Any) -> tuple[int, Any] | None:
    """The latest saved epoch and state, or None when there is no checkpoint."""
    import orbax.checkpoint as ocp

    epoch = manager.latest_step()
    if epoch is None:
        return None
    leaves, treedef = jax.tree.flatten(state)
    abstract = {
        str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        for i, x in enumerate(leaves)
    }
    restored = manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    return epoch, jax.tree.unflatten(treedef, [restored[str(i)] for i in range(len(leaves))])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_metrics(workdir: str, rows: list[dict[str, Any]]) -> None:
    with open(os.path.join(workdir, METRICS_FILE), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_curves(workdir: str, rows: list[dict[str, Any]], title: str) -> str:
    """Loss and accuracy against epochs, as a PNG next to the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax_acc.plot(epochs, [r["test_accuracy"] for r in rows], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(workdir, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def default_workdir(config: Config) -> str:
    return os.path.join(
        "runs", f"{config.dataset}_{config.arch}_{config.optimizer}_seed{config.seed}"
    )


# --------------------------------------------------------------------------------------------------
# The program.


def _progress(total: int, epoch: int, config: Config, is_main: bool):
    if not (config.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True)


def train_and_evaluate(config: Config, workdir: str | None = None, mesh=None) -> dict[str, Any]:
    """Trains ``config``'s model and returns the final metrics (also written to ``workdir``).

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch), ``curves.png`` and orbax
    checkpoints (one per epoch) in ``workdir``. With ``config.resume``, continues from the latest
    checkpoint: a run stopped after epoch k and resumed ends with exactly the weights of an
    uninterrupted run.
    """
    config.validate()
    workdir = workdir or config.workdir or default_workdir(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        config.save(workdir)

    data = load_data(config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    n_data = parallel.data_size(mesh)
    if config.train_bs % n_data:
        raise ValueError(
            f"train_bs {config.train_bs} is not divisible by the {n_data} data-parallel devices"
        )
    steps_per_epoch = _num_train(data) // config.train_bs
    if steps_per_epoch == 0:
        raise ValueError(
            f"train_bs {config.train_bs} is larger than the {_num_train(data)} training examples"
        )
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs

    model = build_model(config, data)
    trainer = Trainer(config, model, make_tx(config, model, total_steps, steps_per_epoch), mesh)

    manager = _checkpoint_manager(workdir) if config.checkpoint else None
    start_epoch, rows = 1, []
    if config.resume and manager is not None:
        restored = restore_checkpoint(manager, trainer.state)
        if restored is not None:
            last, trainer.state = restored
            start_epoch = last + 1
            rows = [r for r in read_metrics(workdir) if r["epoch"] <= last]
    elif is_main:
        _write_metrics(workdir, [])

    train_time, train_images, t_run = 0.0, 0, time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        bar = _progress(steps_per_epoch, epoch, config, is_main)
        sums: dict[str, jax.Array] = {}
        t0 = time.perf_counter()
        timed_from, timed_steps, done = None, 0, 0
        batches = itertools.islice(train_batches(data, config, epoch), steps_per_epoch)
        for step, (x, y) in enumerate(parallel.prefetch_to_device(mesh, batches)):
            done += 1
            metrics = trainer.train_step(x, y)
            sums = metrics if not sums else jax.tree.map(jnp.add, sums, metrics)
            if step == 0:  # Time from the end of the first (compiling) step.
                jax.block_until_ready(metrics)
                timed_from = time.perf_counter()
            else:
                timed_steps += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps_per_epoch - 1:
                    bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()})
        jax.block_until_ready(trainer.state)
        if timed_from is not None and timed_steps:
            train_time += time.perf_counter() - timed_from
            train_images += timed_steps * config.train_bs
        if bar is not None:
            bar.close()
        train = {k: float(v) / max(done, 1) for k, v in sums.items()}
        test = trainer.evaluate(data, config)
        row = {
            "epoch": epoch,
            "train_loss": train.get("loss"),
            "train_accuracy": train.get("accuracy"),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "epoch_time_s": time.perf_counter() - t0,
        }
        if "eta" in train:
            row["eta"] = train["eta"]
        rows.append(row)
        if is_main:
            _write_metrics(workdir, rows)
            print(
                f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
                f"test loss {row['test_loss']:.4f}  acc {row['test_accuracy']:.4f}"
                + (f"  eta {row['eta']:.4f}" if "eta" in row else ""),
                flush=True,
            )
        if manager is not None:
            save_checkpoint(manager, epoch, trainer.state)

    wall = time.perf_counter() - t_run
    final = dict(rows[-1]) if rows else {}
    final.update(
        images_per_second=train_images / train_time if train_time else None,
        wall_time_s=wall,
        num_devices=n_data,
    )
    if is_main and rows:
        plot_curves(workdir, rows, f"{config.optimizer} {config.arch} {config.dataset}")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(final, f, indent=2)
    trainer_params = trainer.params()
    final["params"] = trainer_params
    return final


def summary_line(config: Config, final: dict[str, Any]) -> str:
    ips = final.get("images_per_second")
    return (
        f"{config.optimizer} {config.arch} {config.dataset}: test accuracy {final['test_accuracy']:.4f}, "
        f"test loss {final['test_loss']:.4f}, {final['epoch']} epochs, {final['wall_time_s']:.1f} s, "
        + (f"{ips:.0f} images/s" if ips else "images/s n/a")
        + f" on {final['num_devices']} device(s)"
    )
