"""What a run learns: a classification or a language-modelling task, resolved once per run.

``make_task(config)`` loads the dataset and returns a ``Task`` that knows everything that
differs between the two: how many examples an epoch holds, its training and evaluation batches,
the model's inputs and outputs, how a per-example loss is reduced in evaluation, AGD's roles of
its model, and what the run's summary and final line say. Nothing else in the program asks which
kind of task it runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agd_optax
from benchmarks.config import Config
from benchmarks.data import DATASETS, Dataset, ImageNetData, load_dataset
from benchmarks.data.text import TextData, eval_windows, random_windows
from benchmarks.run_folder import SAMPLES_FILE, write_atomic

SAMPLE_PROMPT = 48  # Bytes of validation text each sample starts from.
SAMPLE_LENGTH = 256  # Bytes generated per sample.
SAMPLE_TEMPERATURE = 0.8


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


class Task:
    """The data of a run and everything that depends on the kind of task."""

    eval_name = "test"  # How the printed epoch lines call the evaluation split.
    initialises_itself = False  # The model takes init="agd" | "gpt2" (else AGD re-initialises).

    def __init__(self, config: Config, data: Any):
        self.config = config
        self.data = data

    # The model.
    def model_spec(self) -> tuple[int, tuple[int, ...], dict[str, Any]]:
        """``(num_classes, input_shape, options)`` for ``models.make_model``."""
        return self.data.num_classes, tuple(self.data.input_shape), {}

    def roles(self, model: nnx.Module) -> Any:
        """AGD's roles of ``model``'s parameters (a pytree of ``agd_optax.Role``), read off its
        module types."""
        return agd_optax.nnx_roles(model)(nnx.state(model, nnx.Param))

    # The data.
    def num_train(self) -> int:
        return self.data.num_train

    def train_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This process's part of each global training batch of ``epoch``: deterministic given
        (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""
        config, data = self.config, self.data
        bs, (n_proc, proc) = config.train_bs, _processes()
        local = _local_batch(bs, n_proc)
        if isinstance(data, ImageNetData):  # Each process decodes only its own images.
            yield from data.train_loader(
                local, seed=config.seed, epoch=epoch, shard_index=proc, shard_count=n_proc
            )
            return
        order = np.random.default_rng([config.seed, epoch]).permutation(data.num_train)
        augment_rng = np.random.default_rng([config.seed, epoch, 1])
        augment = DATASETS[config.dataset].augment if config.augment else None
        mine = slice(proc * local, (proc + 1) * local)
        for start in range(0, data.num_train - bs + 1, bs):
            idx = order[start : start + bs]
            x = data.train_x[idx]
            if augment:  # The whole global batch, so every process count gives the same result.
                x = augment(augment_rng, x)
            yield x[mine], data.train_y[idx][mine]

    def _eval_source(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        bs, data = self.config.test_bs, self.data
        if isinstance(data, ImageNetData):
            return data.eval_loader(bs)
        return (
            (data.test_x[i : i + bs], data.test_y[i : i + bs]) for i in range(0, data.num_test, bs)
        )

    def eval_batches(self, multiple: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Evaluation batches of ``test_bs`` examples (rounded up to a multiple of the
        data-parallel size; the last one padded), with a mask of real examples; this process's
        part of each."""
        n_proc, proc = _processes()
        unit = multiple * n_proc
        for x, y in self._eval_source():  # Every batch padded to one size: one compilation.
            n = len(y)
            size = -(-max(n, self.config.test_bs) // unit) * unit
            pad = size - n
            mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
            local = size // n_proc
            sl = slice(proc * local, (proc + 1) * local)
            yield x[sl], y[sl], mask[sl]

    # What a run reports.
    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        """What the task adds to summary.json."""
        return {}

    def line(self, final: dict[str, Any]) -> str:
        """The run's last printed line."""
        config, ips = self.config, final.get("images_per_second")
        return (
            f"{config.optimizer} {config.arch} {config.dataset}: test accuracy "
            f"{final['test_accuracy']:.4f}, test loss {final['test_loss']:.4f}, {final['epoch']} "
            f"epochs, {final['wall_time_s']:.1f} s, "
            + (f"{ips:.0f} images/s" if ips else "images/s n/a")
            + f" on {final['num_devices']} device(s)"
        )

    def finish(self, workdir: str, model: nnx.Module) -> None:
        """Anything the task writes once training is over (process 0 only)."""


class LanguageModel(Task):
    """Next-token prediction on a token stream (``TextData``): windows of ``context`` tokens."""

    eval_name = "valid"
    initialises_itself = True

    def model_spec(self):
        return self.data.vocab_size, (self.config.context,), {}

    def roles(self, model: nnx.Module) -> Any:
        """Read off the forward pass (``agd_optax.trace_roles``): stacked blocks and tied tables
        included."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens = jnp.zeros((1, self.config.context), jnp.int32)
        forward = lambda p, r, x: nnx.merge(graphdef, p, r)(x)  # noqa: E731
        return agd_optax.trace_roles(forward, params, rest, tokens)

    def num_train(self) -> int:
        """The windows of ``context`` tokens that tile the training tokens (an epoch of random
        windows reads each token once on average)."""
        return int(self.data.train.shape[0]) // self.config.context

    def train_batches(self, epoch: int):
        """``train_bs`` windows of ``context + 1`` tokens at random offsets, as (tokens, next
        tokens), each batch a function of (seed, epoch, step)."""
        config = self.config
        bs, (n_proc, proc) = config.train_bs, _processes()
        local = _local_batch(bs, n_proc)
        for step in itertools.count():
            rng = np.random.default_rng([config.seed, epoch, step])
            w = random_windows(self.data.train, bs, config.context + 1, rng)[proc * local :]
            yield w[:local, :-1], w[:local, 1:]

    def _eval_source(self):
        config = self.config
        windows = eval_windows(self.data.valid, config.context + 1, config.eval_windows)
        for i in range(0, len(windows), config.test_bs):
            w = windows[i : i + config.test_bs]
            yield w[:, :-1], w[:, 1:]

    def summary(self, final):
        """Tokens per second and the corpus (its SHA-256, and the Python whose standard library
        it is); losses are in nats per token (per byte)."""
        ips = final.get("images_per_second")
        return {
            "tokens_per_second": ips * self.config.context if ips else None,
            "loss_unit": "nats per byte",
            "corpus": self.data.describe(),
        }

    def line(self, final):
        config, tps = self.config, final.get("tokens_per_second")
        return (
            f"{config.optimizer} {config.arch} {config.dataset}: validation loss "
            f"{final['test_loss']:.4f} nats/byte, {final['epoch']} epochs of "
            f"{final['steps_per_epoch']} steps, {final['wall_time_s']:.1f} s, "
            + (f"{tps:.0f} tokens/s" if tps else "tokens/s n/a")
            + f" on {final['num_devices']} device(s)"
        )

    def finish(self, workdir, model):
        if self.config.samples and jax.process_count() == 1:
            write_samples(os.path.join(workdir, SAMPLES_FILE), model, self.data, self.config)


def write_samples(path: str, model: nnx.Module, data: TextData, config: Config) -> str:
    """``config.samples`` continuations of validation-text prompts (evenly spaced through the
    validation split), each ``SAMPLE_LENGTH`` tokens at temperature ``SAMPLE_TEMPERATURE``."""
    from benchmarks.models.transformer import generate

    n = config.samples
    prompt = min(SAMPLE_PROMPT, config.context, data.valid.shape[0])
    starts = np.linspace(0, data.valid.shape[0] - prompt, n).astype(np.int64)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 2), n)
    parts = [
        f"# {n} samples after training: {SAMPLE_LENGTH} tokens each at temperature "
        f"{SAMPLE_TEMPERATURE}, after a prompt of {prompt} tokens from the validation text.\n"
    ]
    for i, (start, key) in enumerate(zip(starts, keys)):
        ids = data.valid[start : start + prompt].astype(np.int32)
        out = generate(model, ids, SAMPLE_LENGTH, key, SAMPLE_TEMPERATURE)
        parts.append(
            f"\n=== sample {i + 1}: prompt ===\n{data.decode(ids)}\n"
            f"=== sample {i + 1}: generated ===\n{data.decode(np.asarray(out))}\n"
        )
    write_atomic(path, "".join(parts))
    return path


def _processes() -> tuple[int, int]:
    return jax.process_count(), jax.process_index()


def _local_batch(batch_size: int, n_proc: int) -> int:
    if batch_size % n_proc:
        raise ValueError(f"train_bs {batch_size} is not divisible by the {n_proc} processes")
    return batch_size // n_proc


# --------------------------------------------------------------------------------------------------
# Loading.


def load_data(config: Config) -> Dataset | ImageNetData | TextData:
    """The dataset of ``config`` (``data.DATASETS``), given the Config fields named in its
    ``options``, split by ``config.data_seed``, with a validation split if configured (for text:
    the last part of the training tokens)."""
    options = {
        k: getattr(config, k) for k in DATASETS[config.dataset].options if hasattr(config, k)
    }
    data = load_dataset(
        config.dataset, config.data_dir, download=config.download, seed=config.data_seed, **options
    )
    if config.validation_split and isinstance(data, TextData):
        return text_validation_split(data, config.validation_split)
    if config.validation_split:
        if not isinstance(data, Dataset):
            raise ValueError(
                f"validation_split is for in-memory datasets; {config.dataset} is streamed from "
                "its folders (hold out a split of its train/ folder on disk instead)"
            )
        data = validation_split(data, config.validation_split)
    return data


def text_validation_split(data: TextData, fraction: float) -> TextData:
    """Hold out the last ``fraction`` of the training tokens as the validation set, so that
    hyperparameters are tuned without reading the corpus's own validation split."""
    n_val = max(1, int(round(fraction * data.train.shape[0])))
    return dataclasses.replace(data, train=data.train[:-n_val], valid=data.train[-n_val:])


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


def task_type(config: Config) -> type[Task]:
    """The kind of task of ``config``: the one place the program tells a language model from a
    classifier, by the kind of its dataset (which ``Config.validate`` matched to the arch's)."""
    return LanguageModel if DATASETS[config.dataset].task == "language" else Task


def make_task(config: Config) -> Task:
    """The task of ``config``, its data loaded."""
    return task_type(config)(config, load_data(config))
