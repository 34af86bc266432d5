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
    options: tuple[tuple[str, Any], ...] = ()  # The optimizer's own options (Config field).

    @property
    def tuned(self) -> bool:
        return len(self.grid) > 1


def _entries() -> tuple[Entry, ...]:
    """The table's rows, in the registry's order: each optimizer's ``compare`` rows."""
    return tuple(
        Entry(row.label or name, name, row.gain, row.grid, row.description, row.options)
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


def _fcn(name: str, title: str, dataset: str, **config: Any) -> Workload:
    return Workload(name, title, dict(dataset=dataset, arch="fcn", **config))


def _named(name: str, title: str, dataset: str, arch: str, **config: Any) -> Workload:
    """An architecture of fixed depth at its own width."""
    return Workload(name, title, dict(dataset=dataset, arch=arch, depth=None, width=None, **config))


XENT, MSE = dict(loss="xent"), dict(loss="mse")
SUITES: dict[str, tuple[Workload, ...]] = {
    "digits": (
        _fcn("digits_fcn", "digits (8x8), FCN depth 3 width 256, cross-entropy", "digits",
             depth=3, width=256, epochs=40, **XENT),
    ),
    "mnist1d": (
        _fcn("mnist1d_mlp", "MNIST-1D, FCN depth 3 width 256, cross-entropy", "mnist1d",
             depth=3, width=256, epochs=60, **XENT),
        Workload("mnist1d_cnn", "MNIST-1D, CNN1D (3 convs of 32 channels + linear), cross-entropy",
                 dict(dataset="mnist1d", arch="cnn1d", depth=4, width=32, epochs=60, **XENT)),
    ),
    # The paper's workloads (square loss and batch 128 on CIFAR; cross-entropy and batch 1024 on
    # ImageNet). They need the data on disk (--data-dir) and an accelerator.
    "cifar10": (
        _fcn("cifar10_fcn16", "CIFAR-10, FCN depth 16 width 512, square loss", "cifar10",
             depth=16, width=512, epochs=200, **MSE),
        _named("cifar10_resnet18", "CIFAR-10, ResNet-18, square loss", "cifar10", "resnet18",
               epochs=200, **MSE),
    ),
    "cifar100": (
        _named("cifar100_vgg16", "CIFAR-100, VGG-16, square loss", "cifar100", "vgg16",
               epochs=200, **MSE),
    ),
    # Held out from the choice of agd_momentum (docs/agd_variants.md): a deeper MLP with biases
    # (a CPU runs it), and a VGG on CIFAR-10-shaped generated images (an accelerator's job).
    "heldout": (
        _fcn("mnist1d_deep_mlp", "MNIST-1D, FCN depth 8 width 256 with biases, cross-entropy",
             "mnist1d", depth=8, width=256, bias=True, epochs=60, **XENT),
        Workload("shapes_vgg", "shapes (32x32x3, 10 classes), VGG-16 width 8, cross-entropy",
                 dict(dataset="shapes", arch="vgg16", depth=None, width=8, epochs=15, **XENT)),
    ),
    "imagenet": (
        _named("imagenet_resnet50", "ImageNet, ResNet-50, cross-entropy, batch 1024", "imagenet",
               "resnet50", epochs=350, train_bs=1024, test_bs=1024, **XENT),
    ),
}  # fmt: skip


def needs_data_dir(suite: str) -> bool:
    """Whether a suite reads dataset files (rather than generated or bundled data)."""
    return any(not DATASETS[w.config["dataset"]].bundled for w in SUITES[suite])
