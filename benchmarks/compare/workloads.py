"""What the evidence suite compares: the optimizer rows of its tables and the workloads of each suite."""

from __future__ import annotations

import dataclasses
from typing import Any

SUITES_NEEDING_DATA = ("cifar10", "cifar100", "imagenet")


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


SGD_GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

ENTRIES: tuple[Entry, ...] = (
    Entry("agd", "agd", 1.0, description="AGD, gain 1 (the published algorithm, no setting)"),
    Entry("agd_gain10", "agd", 10.0, description="AGD, gain 10"),
    Entry("sgd_momentum", "sgd", grid=SGD_GRID, description="SGD, momentum 0.9, tuned lr"),
    Entry("adam", "adam", grid=ADAM_GRID, description="Adam, tuned lr"),
    Entry("nadamw", "nadamw", grid=ADAM_GRID, description="NadamW (weight decay 0), tuned lr"),
    Entry("prodigy", "prodigy", description="Prodigy, defaults"),
    Entry("dog", "dog", description="DoG, defaults"),
    Entry("dadapt_adamw", "dadapt_adamw", description="D-Adaptation AdamW, defaults"),
    Entry("cocob", "cocob", description="COCOB, defaults"),
    Entry("mechanize", "mechanize", description="Mechanic on Adam, defaults"),
    Entry(
        "schedule_free_adamw", "schedule_free_adamw", description="Schedule-free AdamW, defaults"
    ),
)


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
# ImageNet has no held-out split in the training program: the baselines run at one learning rate
# each (SGD at 0.1 as in the paper), untuned, rather than be tuned on the validation (test) set.
FIXED_LR = {"sgd": 0.1, "adam": 1e-3, "nadamw": 1e-3}
