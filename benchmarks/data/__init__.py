"""Datasets for the AGD benchmarks: the ``DATASETS`` table, read by ``load_dataset``.

In-memory datasets (digits, mnist1d, mnist, cifar10, cifar100) come back as a
``Dataset`` of numpy arrays; ImageNet comes back as an ``ImageNetData`` with streaming
``train_loader`` / ``eval_loader``. Nothing is downloaded unless ``download=True``.

Adding a dataset is one entry in ``DATASETS``: its loader, whether it can be downloaded, whether
a seed draws its split, the ``Config`` fields its loader takes, and its training augmentation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from benchmarks.data.base import DEFAULT_DATA_DIR, Dataset, normalize
from benchmarks.data.cifar import (
    CIFAR_SPECS,
    augment_cifar,
    load_cifar,
    load_cifar10,
    load_cifar100,
)
from benchmarks.data.download import download_file
from benchmarks.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    ImageNetData,
    load_imagenet,
)
from benchmarks.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist, parse_idx, read_idx
from benchmarks.data.shapes import load_shapes
from benchmarks.data.small import load_digits, load_mnist1d
from benchmarks.data.text import TextData, load_text

__all__ = [
    "CIFAR_SPECS",
    "CorruptImageError",
    "DATASETS",
    "DatasetInfo",
    "DEFAULT_DATA_DIR",
    "Dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetData",
    "MNIST_MEAN",
    "MNIST_STD",
    "augment_cifar",
    "download_file",
    "load_cifar",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_imagenet",
    "load_mnist",
    "load_mnist1d",
    "normalize",
    "parse_idx",
    "read_idx",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One dataset: ``load(data_dir, download=..., seed=..., **options)``."""

    load: Callable[..., Dataset | ImageNetData]
    description: str
    bundled: bool = False  # Generated or shipped with a package: no files, no --data-dir.
    downloadable: bool = False
    seeded: bool = False  # ``seed`` draws the split (None: the standard one); else refused.
    options: tuple[str, ...] = ()  # Keyword options of ``load``; the same-named Config fields.
    augment: Callable | None = None  # ``(rng, batch) -> batch`` for training batches.
    streamed: bool = False  # Read from disk batch by batch (an ``ImageNetData``), not in memory.
    caches: bool = False  # Writes what it generates under ``data_dir`` (MNIST-1D).
    task: str = "classification"  # Or "language": a ``TextData`` token stream.


def _imagenet(data_dir, download, seed, **options):
    return load_imagenet(data_dir, **options)


def _cifar(name: str, description: str) -> DatasetInfo:
    def load(data_dir, download, seed, **options):
        return load_cifar(name, data_dir, download=download, **options)

    options = ("official_normalization",)
    return DatasetInfo(load, description, downloadable=True, options=options, augment=augment_cifar)


def _text(name: str, description: str, bundled: bool = False) -> DatasetInfo:
    def load(data_dir, download, seed, **options):
        return load_text(name, data_dir, **options)

    return DatasetInfo(
        load, description + ", as bytes", bundled, options=("vocab",), task="language"
    )


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        lambda data_dir, download, seed: load_digits(seed),
        "scikit-learn's 8x8 digits, 1437 train / 360 test",
        bundled=True,
        seeded=True,
    ),
    "mnist1d": DatasetInfo(
        lambda data_dir, download, seed: load_mnist1d(data_dir, seed=seed),
        "MNIST-1D, 4000 train / 1000 test signals of length 40 (generated)",
        bundled=True,
        seeded=True,
        caches=True,
    ),
    "shapes": DatasetInfo(
        lambda data_dir, download, seed: load_shapes(),
        "shapes: CIFAR-10-shaped (32x32x3, 10 classes) images of shapes, 5000 train / 1000 test "
        "(generated)",
        bundled=True,
    ),
    "mnist": DatasetInfo(
        lambda data_dir, download, seed: load_mnist(data_dir, download=download),
        "MNIST, 60000 / 10000 images of 28x28",
        downloadable=True,
    ),
    "cifar10": _cifar("cifar10", "CIFAR-10, 50000 / 10000 images of 32x32x3"),
    "cifar100": _cifar("cifar100", "CIFAR-100 (fine labels), 50000 / 10000 images of 32x32x3"),
    "imagenet": DatasetInfo(
        _imagenet,
        "ImageNet (ILSVRC-2012) folders, streamed and decoded on the fly",
        options=("image_size", "resize_size", "num_workers", "num_threads"),
        streamed=True,
    ),
    "pystdlib": _text("pystdlib", "the Python standard library's source (no download)", True),
    "text": _text("text", "a text file or a folder of them (--data-dir)"),
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    seed: int | None = None,
    **options,
) -> Dataset | ImageNetData | TextData:
    """Load a dataset by name (one of ``DATASETS``).

    Args:
      name: dataset name.
      data_dir: folder holding the files (default ``./data``); mnist1d caches its
        generated arrays there if given; digits ignores it.
      download: fetch missing mnist/cifar files (checksum-verified); an error for the
        other datasets.
      seed: the data seed of digits (its stratified train/test split) and MNIST-1D (its
        generator); None: the standard split. An error for datasets with a fixed split.
      **options: the dataset's own options (``DatasetInfo.options``): for ``"imagenet"``
        ``image_size``, ``resize_size``, ``num_workers``, ``num_threads`` (see
        ``load_imagenet``); for CIFAR ``official_normalization`` (see ``load_cifar``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    info = DATASETS[key]
    if download and not info.downloadable:
        downloadable = [n for n, d in DATASETS.items() if d.downloadable]
        raise ValueError(f"download=True is only supported for {', '.join(downloadable)}")
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        takers = [repr(n) for n, d in DATASETS.items() if set(unknown) <= set(d.options)]
        raise ValueError(
            f"options {unknown} only apply to {', '.join(takers) or 'no dataset'}, not {name!r}"
        )
    if seed is not None and not info.seeded:
        raise ValueError(
            f"{name!r} has a fixed train/test split; a data seed ({seed}) does not apply to it"
        )
    return info.load(data_dir, download, seed, **options)
