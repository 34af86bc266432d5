"""Datasets for the AGD benchmarks, and the ``load_dataset`` registry.

In-memory datasets (digits, mnist1d, mnist, cifar10, cifar100) come back as a
``Dataset`` of numpy arrays; ImageNet comes back as an ``ImageNetData`` with streaming
``train_loader`` / ``eval_loader``. Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import os

from benchmarks.data.base import DEFAULT_DATA_DIR, Dataset, iterate_batches, normalize
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
from benchmarks.data.small import load_digits, load_mnist1d

__all__ = [
    "CIFAR_SPECS",
    "CorruptImageError",
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "Dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetData",
    "MNIST_MEAN",
    "MNIST_STD",
    "augment_cifar",
    "download_file",
    "iterate_batches",
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

DATASETS = ("digits", "mnist1d", "mnist", "cifar10", "cifar100", "imagenet")
_DOWNLOADABLE = ("mnist", "cifar10", "cifar100")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    seed: int = 0,
    **imagenet_options,
) -> Dataset | ImageNetData:
    """Load a dataset by name (one of ``DATASETS``).

    Args:
      name: dataset name.
      data_dir: folder holding the files (default ``./data``); mnist1d caches its
        generated arrays there if given; digits ignores it.
      download: fetch missing mnist/cifar files (checksum-verified); an error for the
        other datasets.
      seed: seed of the digits train/test split (other datasets have fixed splits).
      **imagenet_options: for ``"imagenet"`` only: ``image_size``, ``resize_size``,
        ``num_workers``, ``num_threads`` (see ``load_imagenet``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if download and key not in _DOWNLOADABLE:
        raise ValueError(f"download=True is only supported for {', '.join(_DOWNLOADABLE)}")
    if imagenet_options and key != "imagenet":
        raise ValueError(
            f"options {sorted(imagenet_options)} only apply to 'imagenet', not {name!r}"
        )
    if key == "digits":
        return load_digits(seed)
    if key == "mnist1d":
        return load_mnist1d(data_dir)
    if key == "mnist":
        return load_mnist(data_dir, download=download)
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, data_dir, download=download)
    return load_imagenet(data_dir, **imagenet_options)
