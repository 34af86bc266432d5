"""What the evidence suite compares: the optimizer rows of its tables (from each optimizer's
``compare`` rows in ``benchmarks.optimizers.OPTIMIZERS``) and the workloads of each suite.

Adding a workload is one ``Workload`` in ``SUITES``; a new suite is a new key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.data import DATASETS
from benchmarks.optimizers import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer cell of the table: ``grid`` empty means run at its defaults, untuned."""

    label: str
    optimizer: str
    gain: float = 1.0
    grid: tuple[float, ...] = ()
    description: str = ""

    @property
    def tuned(self) -> bool:
        return len(self.grid) > 1


def _entries() -> tuple[Entry, ...]:
    """The table's rows, in the registry's order: each optimizer's ``compare`` rows."""
    return tuple(
        Entry(row.label, name, row.gain, row.grid, row.description)
        for name, spec in OPTIMIZERS.items()
        for row in spec.compare
    )


ENTRIES: tuple[Entry, ...] = _entries()


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model on one dataset: ``config`` holds the ``Config`` fields it fixes."""

    name: str
    title: str
    config: dict[str, Any]


SUITES: dict[str, tuple[Workload, ...]] = {
    "digits": (
        Workload(
            "digits_fcn",
            "digits (8x8), FCN depth 3 width 256, cross-entropy",
            dict(dataset="digits", arch="fcn", depth=3, width=256, loss="xent", epochs=40),
        ),
    ),
    "mnist1d": (
        Workload(
            "mnist1d_mlp",
            "MNIST-1D, FCN depth 3 width 256, cross-entropy",
            dict(dataset="mnist1d", arch="fcn", depth=3, width=256, loss="xent", epochs=60),
        ),
        Workload(
            "mnist1d_cnn",
            "MNIST-1D, CNN1D (3 convs of 32 channels + linear), cross-entropy",
            dict(dataset="mnist1d", arch="cnn1d", depth=4, width=32, loss="xent", epochs=60),
        ),
    ),
    # The paper's workloads (square loss and batch 128 on CIFAR; cross-entropy and batch 1024 on
    # ImageNet). They need the data on disk (--data-dir) and an accelerator.
    "cifar10": (
        Workload(
            "cifar10_fcn16",
            "CIFAR-10, FCN depth 16 width 512, square loss",
            dict(dataset="cifar10", arch="fcn", depth=16, width=512, loss="mse", epochs=200),
        ),
        Workload(
            "cifar10_resnet18",
            "CIFAR-10, ResNet-18, square loss",
            dict(
                dataset="cifar10", arch="resnet18", depth=None, width=None, loss="mse", epochs=200
            ),
        ),
    ),
    "cifar100": (
        Workload(
            "cifar100_vgg16",
            "CIFAR-100, VGG-16, square loss",
            dict(dataset="cifar100", arch="vgg16", depth=None, width=None, loss="mse", epochs=200),
        ),
    ),
    "imagenet": (
        Workload(
            "imagenet_resnet50",
            "ImageNet, ResNet-50, cross-entropy, batch 1024",
            dict(
                dataset="imagenet",
                arch="resnet50",
                depth=None,
                width=None,
                loss="xent",
                train_bs=1024,
                test_bs=1024,
                epochs=350,
            ),
        ),
    ),
}


def needs_data_dir(suite: str) -> bool:
    """Whether a suite reads dataset files (rather than generated or bundled data)."""
    return any(not DATASETS[w.config["dataset"]].bundled for w in SUITES[suite])
