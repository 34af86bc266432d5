"""The input pipeline: a config's dataset, and the batches each process feeds its devices."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import jax
import numpy as np

from benchmarks.config import Config
from benchmarks.data import DATASETS, Dataset, ImageNetData, load_dataset
from benchmarks.data.text import TextData, eval_windows, random_windows


def load_data(config: Config) -> Dataset | ImageNetData | TextData:
    """The dataset of ``config`` (``data.DATASETS``), given the Config fields named in its
    ``options``, split by ``config.data_seed``, with a validation split if configured (for text:
    the last part of the training tokens)."""
    fields = {f.name for f in dataclasses.fields(config)}
    options = {k: getattr(config, k) for k in DATASETS[config.dataset].options if k in fields}
    data = load_dataset(
        config.dataset,
        config.data_dir,
        download=config.download,
        seed=config.data_seed,
        **options,
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


def num_train_examples(data: Dataset | ImageNetData | TextData, config: Config) -> int:
    """Training examples per epoch: images, or for text the windows of ``context`` tokens that
    tile the training tokens (an epoch of random windows reads each token once on average)."""
    if isinstance(data, TextData):
        return int(data.train.shape[0]) // config.context
    return data.num_train


def train_batches(
    data: Dataset | ImageNetData | TextData, config: Config, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's part of each global training batch of ``epoch``: deterministic given
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one. For text, a
    batch is ``train_bs`` windows of ``context + 1`` tokens at random offsets, as (tokens,
    next tokens)."""
    bs = config.train_bs
    n_proc, proc = jax.process_count(), jax.process_index()
    if bs % n_proc:
        raise ValueError(f"train_bs {bs} is not divisible by the {n_proc} processes")
    local = bs // n_proc
    if isinstance(data, TextData):
        for step in itertools.count():
            rng = np.random.default_rng([config.seed, epoch, step])
            w = random_windows(data.train, bs, config.context + 1, rng)[proc * local :][:local]
            yield w[:, :-1], w[:, 1:]
    if isinstance(data, ImageNetData):  # Each process decodes only its own images.
        yield from data.train_loader(
            local, seed=config.seed, epoch=epoch, shard_index=proc, shard_count=n_proc
        )
        return
    order = np.random.default_rng([config.seed, epoch]).permutation(data.num_train)
    augment_rng = np.random.default_rng([config.seed, epoch, 1])
    augment = DATASETS[config.dataset].augment if config.augment else None
    for start in range(0, data.num_train - bs + 1, bs):
        idx = order[start : start + bs]
        x = data.train_x[idx]
        if augment:  # The whole global batch, so every process count gives the same result.
            x = augment(augment_rng, x)
        yield (
            x[proc * local : (proc + 1) * local],
            data.train_y[idx][proc * local : (proc + 1) * local],
        )


def eval_batches(
    data: Dataset | ImageNetData | TextData, config: Config, multiple: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Test batches padded to a multiple of the data-parallel size, with a mask of real examples.
    For text: ``eval_windows`` windows of the validation tokens, evenly spaced."""
    if isinstance(data, ImageNetData):
        source = data.eval_loader(config.test_bs)
    elif isinstance(data, TextData):
        windows = eval_windows(data.valid, config.context + 1, config.eval_windows)
        source = (
            (w[:, :-1], w[:, 1:])
            for w in (
                windows[i : i + config.test_bs] for i in range(0, len(windows), config.test_bs)
            )
        )
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
        y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
        local = size // n_proc
        sl = slice(proc * local, (proc + 1) * local)
        yield x[sl], y[sl], mask[sl]
