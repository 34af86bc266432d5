"""Small datasets generated or bundled locally: scikit-learn digits and MNIST-1D."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from benchmarks.cache import cache_dir, cached_arrays
from benchmarks.data.base import Dataset, normalize

DIGITS_NUM_TEST = 360
DIGITS_NUM_TOTAL = 1797
MNIST1D_NUM_TRAIN = 4000
MNIST1D_NUM_TEST = 1000
MNIST1D_LENGTH = 40
MNIST1D_CACHE = "mnist1d_default.npz"


def _split_digits(seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=DIGITS_NUM_TEST, stratify=y, random_state=seed
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _check_digits(arrays: dict[str, np.ndarray]) -> None:
    n_train = DIGITS_NUM_TOTAL - DIGITS_NUM_TEST
    expected = {
        "train_x": (n_train, 8, 8, 1),
        "train_y": (n_train,),
        "test_x": (DIGITS_NUM_TEST, 8, 8, 1),
        "test_y": (DIGITS_NUM_TEST,),
    }
    for key, shape in expected.items():
        if key not in arrays or tuple(arrays[key].shape) != shape:
            raise ValueError(f"malformed digits split: {key!r}, expected shape {shape}")


def load_digits(seed: int | None = None) -> Dataset:
    """scikit-learn's 8x8 digits: 1437 train / 360 test (stratified split by ``seed``; None is
    the standard split, seed 0).

    Pixels are scaled to [0, 1] (divided by 16), then normalised with the mean/std of
    the training split. Images have shape ``(N, 8, 8, 1)``. The split is cached, with its
    checksum, in the program's cache folder (``benchmarks.cache``), so later runs need not
    import scikit-learn.
    """
    seed = 0 if seed is None else seed
    path = cache_dir("digits") / f"digits_seed{seed}.npz"
    arrays = cached_arrays(path, lambda: _split_digits(seed), _check_digits)
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    test_x, test_y = arrays["test_x"], arrays["test_y"]
    mean = (float(train_x.mean()),)
    std = (float(train_x.std()),)
    return Dataset(
        train_x=normalize(train_x, mean, std),
        train_y=np.ascontiguousarray(train_y, dtype=np.int32),
        test_x=normalize(test_x, mean, std),
        test_y=np.ascontiguousarray(test_y, dtype=np.int32),
        num_classes=10,
        input_shape=(8, 8, 1),
        mean=mean,
        std=std,
    )


def generate_mnist1d(seed: int | None = None) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with the ``mnist1d`` package's default arguments (no download); with
    ``seed``, the generator's seed instead of its default (42).

    Returns a dict with ``x`` (4000, 40), ``y``, ``x_test`` (1000, 40), ``y_test``. The
    generator reseeds Python's and NumPy's global RNGs; their states are restored here.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    # The generator uses the legacy global RNGs; save and restore them.
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        args = get_dataset_args()
        if seed is not None:
            args.seed = seed
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}


def _check_mnist1d(arrays: dict[str, np.ndarray], source: str) -> None:
    expected = {
        "x": (MNIST1D_NUM_TRAIN, MNIST1D_LENGTH),
        "y": (MNIST1D_NUM_TRAIN,),
        "x_test": (MNIST1D_NUM_TEST, MNIST1D_LENGTH),
        "y_test": (MNIST1D_NUM_TEST,),
    }
    for key, shape in expected.items():
        if key not in arrays or tuple(arrays[key].shape) != shape:
            got = None if key not in arrays else arrays[key].shape
            raise ValueError(
                f"malformed MNIST-1D data from {source}: {key!r} has shape {got}, expected {shape}"
            )


def load_mnist1d(data_dir: str | os.PathLike | None = None, seed: int | None = None) -> Dataset:
    """MNIST-1D (default generator arguments): 4000 train / 1000 test, x shape (N, 40, 1).

    ``seed`` is the generator's seed (None: its default, the standard MNIST-1D); a different seed
    gives a different draw of the whole dataset, train and test.

    The generator already standardises the signals (global mean 0, std 1), so no further
    normalisation is applied. The generated arrays are cached, with their SHA-256, as
    ``mnist1d/mnist1d_default.npz`` (with a seed, ``mnist1d_seed<N>.npz``) in ``data_dir``, or
    without it in the program's cache folder (``benchmarks.cache``), and read from there next
    time; a damaged file is generated again.
    """
    name = MNIST1D_CACHE if seed is None else f"mnist1d_seed{seed}.npz"
    folder = cache_dir("mnist1d") if data_dir is None else Path(data_dir) / "mnist1d"
    arrays = cached_arrays(
        folder / name,
        lambda: generate_mnist1d() if seed is None else generate_mnist1d(seed),
        lambda a: _check_mnist1d(a, str(folder / name)),
    )
    return Dataset(
        train_x=arrays["x"].astype(np.float32)[..., None],
        train_y=arrays["y"].astype(np.int32),
        test_x=arrays["x_test"].astype(np.float32)[..., None],
        test_y=arrays["y_test"].astype(np.int32),
        num_classes=10,
        input_shape=(MNIST1D_LENGTH, 1),
    )
