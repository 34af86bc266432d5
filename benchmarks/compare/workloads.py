"""What the evidence suite compares: the optimizer rows of its tables (from each optimizer's
``compare`` rows in ``benchmarks.optimizers.OPTIMIZERS``) and the workloads of each suite.

Adding a workload is one ``Workload`` in ``SUITES``; a new suite is a new key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from benchmarks.data import DATASETS
from benchmarks.optimizers import OPTIMIZERS, Row


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer cell of the table: ``grid`` empty means run at its defaults, untuned."""

    label: str
    optimizer: str
    gain: float = 1.0
    grid: tuple[float, ...] = ()
    description: str = ""
    options: tuple[tuple[str, Any], ...] = ()  # The optimizer's own options (Config field).
    schedule: str = "constant"  # The learning-rate schedule of the baselines' runs.
    warmup_epochs: float = 0.0
    agd_rule: str = "library"  # AGD's rule (benchmarks.rules); "library": agd() alone.

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


# A language model: AdamW with the usual LM recipe (linear warmup, then cosine decay to zero) tuned
# over its peak learning rate, against AGD, AGD with momentum, the learning-rate-free optimizers at
# their defaults and the AlgoPerf one-configuration entries.
LM_GRID = (3e-3, 1e-2, 3e-2)
LR_FREE = ("prodigy", "dog", "dadapt_adamw", "cocob", "mechanize", "schedule_free_adamw")
AGD = next(e for e in ENTRIES if e.label == "agd")
ALGOPERF = ("schedule_free_adamw_algoperf", "nadamw_algoperf")
LM_ENTRIES: tuple[Entry, ...] = (
    AGD,
    next(e for e in ENTRIES if e.label == "agd_momentum"),
    Entry(
        "adamw_warmup_cosine",
        "adamw",
        grid=LM_GRID,
        schedule="warmup_cosine",
        warmup_epochs=0.5,
        description="AdamW (weight decay 0), warmup over half an epoch then cosine to 0, tuned lr",
    ),
    *(e for e in ENTRIES if e.label in LR_FREE),
    *(e for e in ENTRIES if e.label in ALGOPERF),  # One configuration for every workload.
)


# AGD's rules for 1-D parameters, embeddings and tied tables (benchmarks.rules), side by side.
RULE_ENTRIES = {
    rule: Entry(f"agd_{rule}", "agd", agd_rule=rule, description=f"AGD, rule {rule}")
    for rule in ("1d_lr_free", "1d_frozen", "embedding_fan_in_vocab")
}
RULES_1D = (AGD, RULE_ENTRIES["1d_lr_free"], RULE_ENTRIES["1d_frozen"])


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model on one dataset: ``config`` holds the ``Config`` fields it fixes."""

    name: str
    title: str
    config: dict[str, Any]
    metric: str = "accuracy"  # What is reported and tuned on: "accuracy" (higher) or "loss".
    entries: tuple[Entry, ...] | None = None  # The table's rows; None: ENTRIES.
    # Points a tuned row's grid may gain past its edge while the choice sits on one (0: none).
    extend_grid: int = 0


def _fcn(name: str, title: str, dataset: str, **config: Any) -> Workload:
    return Workload(name, title, dict(dataset=dataset, arch="fcn", **config))


def _named(name: str, title: str, dataset: str, arch: str, **config: Any) -> Workload:
    """An architecture of fixed depth at its own width."""
    return Workload(name, title, dict(dataset=dataset, arch=arch, depth=None, width=None, **config))


XENT, MSE = dict(loss="xent"), dict(loss="mse")


_LM_SMALL = dict(
    dataset="pystdlib",
    arch="transformer",
    depth=2,
    width=64,
    heads=4,
    context=64,
    loss="xent",
    train_bs=16,
    test_bs=64,
    epochs=6,
    max_steps_per_epoch=50,
    eval_windows=128,
    samples=0,
)

# Round two's held-out suite (docs/agd_variants.md, "Round two: protocol"). Every tuned row gets
# a grid of at least 5 half-decade points, extended past an edge choice by up to EXTEND_GRID points;
# the zero-settings peers run at their defaults.
#
# CANDIDATES: the round's candidates, by optimizer name (registered in benchmarks.optimizers): one
# line each. A candidate's rows are its registry entry's ``compare`` rows, or one row at its
# defaults named after it. Put a name here only once the choice on the calibration workloads is
# committed; ``--candidates`` adds rows for one invocation without editing this file.
CANDIDATES: tuple[str, ...] = ()
EXTEND_GRID = 4
HALF_DECADE_SGD = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
HALF_DECADE_ADAM = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
HALF_DECADE_LM = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
PEERS = (*LR_FREE, *ALGOPERF)  # The zero-settings peers: the bar's "best zero-settings peer".


def candidate_entries(names: Sequence[str]) -> tuple[Entry, ...]:
    """The rows of the candidates ``names`` (optimizer names of ``OPTIMIZERS``)."""
    out = []
    for name in names:
        if name not in OPTIMIZERS:
            raise ValueError(
                f"candidate {name!r} is not a registered optimizer; register it in "
                f"benchmarks/optimizers.py first (known: {', '.join(OPTIMIZERS)})"
            )
        spec = OPTIMIZERS[name]
        rows = spec.compare or (Row("", f"{spec.description} (candidate, defaults)"),)
        out += [
            Entry(r.label or name, name, r.gain, r.grid, r.description, r.options) for r in rows
        ]
    return tuple(out)


def _row(label: str) -> Entry:
    return next(e for e in ENTRIES if e.label == label)


_HELDOUT2_TUNED = (
    dataclasses.replace(_row("sgd_momentum"), grid=HALF_DECADE_SGD),
    dataclasses.replace(_row("adam"), grid=HALF_DECADE_ADAM),
    dataclasses.replace(_row("nadamw"), grid=HALF_DECADE_ADAM),
)
_HELDOUT2_ZERO = (*(_row(p) for p in PEERS), _row("agd"), _row("agd_momentum"))
HELDOUT2_ENTRIES = (*_HELDOUT2_TUNED, *_HELDOUT2_ZERO, *candidate_entries(CANDIDATES))
# On the LM also AdamW and Muon with the LM recipe: linear warmup over the first epoch (a twelfth
# of the run, as round one's 25 of 300 steps), then cosine decay to zero, tuned over the peak.
_LM_RECIPE: dict[str, Any] = dict(schedule="warmup_cosine", warmup_epochs=1.0, grid=HALF_DECADE_LM)
HELDOUT2_LM_ENTRIES = (
    *_HELDOUT2_TUNED,
    Entry("adamw_warmup_cosine", "adamw", description="AdamW (weight decay 0), warmup over the "
          "first twelfth then cosine to 0, tuned lr", **_LM_RECIPE),
    Entry("muon_warmup_cosine", "muon", description="Muon (optax.contrib.muon; see the registry), "
          "warmup over the first twelfth then cosine to 0, tuned lr", **_LM_RECIPE),
    *_HELDOUT2_ZERO,
    *candidate_entries(CANDIDATES),
)  # fmt: skip
_HELDOUT2: dict[str, Any] = dict(
    metric="accuracy", entries=HELDOUT2_ENTRIES, extend_grid=EXTEND_GRID
)

SUITES: dict[str, tuple[Workload, ...]] = {
    # A byte-level transformer on the Python standard library's source (no download); an epoch
    # is 50 steps of 16 windows of 64 bytes (validation: 128 windows). Losses in nats per byte.
    "lm": (
        Workload(
            "pystdlib_transformer",
            "pystdlib bytes, transformer depth 2 width 64 (4 heads), context 64",
            _LM_SMALL,
            metric="loss",
            entries=LM_ENTRIES,
        ),
    ),
    # A larger LM for an accelerator: 10 epochs of 100 steps of 32 windows of 256 bytes.
    "lm_large": (
        Workload(
            "pystdlib_transformer_large",
            "pystdlib bytes, transformer depth 4 width 256 (8 heads), context 256",
            dict(
                _LM_SMALL,
                depth=4,
                width=256,
                heads=8,
                context=256,
                train_bs=32,
                epochs=10,
                max_steps_per_epoch=100,
            ),
            metric="loss",
            entries=LM_ENTRIES,
        ),
    ),
    # AGD's rules on the small LM with biases and LayerNorm parameters, a deeper and wider one, the
    # small LM tied, and a ResNet-18 with biases and affine BatchNorm.
    "rules": (
        Workload(
            "rules_lm",
            "pystdlib bytes, transformer as in 'lm' with biases and LayerNorm scales/offsets",
            dict(_LM_SMALL, bias=True),
            metric="loss",
            entries=(*RULES_1D, RULE_ENTRIES["embedding_fan_in_vocab"]),
        ),
        Workload(
            "rules_lm_d4w128",
            "pystdlib bytes, transformer depth 4 width 128 (4 heads), context 64, with biases and "
            "LayerNorm scales/offsets",
            dict(_LM_SMALL, depth=4, width=128, bias=True),
            metric="loss",
            entries=(*RULES_1D, RULE_ENTRIES["embedding_fan_in_vocab"]),
        ),
        Workload(
            "rules_lm_tied",
            "pystdlib bytes, the same transformer with a tied embedding/head",
            dict(_LM_SMALL, bias=True, tied=True),
            metric="loss",
            entries=(AGD, RULE_ENTRIES["embedding_fan_in_vocab"]),
        ),
        Workload(
            "rules_resnet18",
            "digits (8x8), ResNet-18 width 16 with biases and affine BatchNorm, cross-entropy",
            dict(
                dataset="digits",
                arch="resnet18",
                depth=None,
                width=16,
                bias=True,
                loss="xent",
                epochs=20,
            ),
            entries=RULES_1D,
        ),
    ),
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
    # Held out from the choice of agd_momentum (docs/agd_variants.md): a deeper MLP with biases,
    # and a VGG on CIFAR-10-shaped generated images. The VGG's 5 epochs (first written as 15) were
    # set from the time of one run on a 2-core CPU, before any optimizer's result on it was read.
    "heldout": (
        _fcn("mnist1d_deep_mlp", "MNIST-1D, FCN depth 8 width 256 with biases, cross-entropy",
             "mnist1d", depth=8, width=256, bias=True, epochs=60, **XENT),
        Workload("shapes_vgg", "shapes (32x32x3, 10 classes), VGG-16 width 8, cross-entropy",
                 dict(dataset="shapes", arch="vgg16", depth=None, width=8, epochs=5, **XENT)),
    ),
    # Round two's held-out workloads, declared before any optimizer ran on them; epochs of the VGG
    # and the ResNet are set by the rules of the protocol (the VGG's doubling from 10, one timing
    # run each), written here before any candidate runs on them.
    "heldout2": (
        Workload(
            "lm_long",
            "pystdlib bytes, transformer depth 2 width 64 (4 heads), context 64, batch 32, "
            "1,200 steps",
            dict(_LM_SMALL, train_bs=32, epochs=12, max_steps_per_epoch=100),
            metric="loss",
            entries=HELDOUT2_LM_ENTRIES,
            extend_grid=EXTEND_GRID,
        ),
        Workload("shapes_vgg_long", "shapes (32x32x3, 10 classes), VGG-16 width 8, cross-entropy",
                 # 40 epochs: the rule's doubling from 10 (NadamW, the best tuned row, rose 12.3
                 # points over the last fifth at 10 epochs, 7.2 at 20, -1.2 at 40).
                 dict(dataset="shapes", arch="vgg16", depth=None, width=8, epochs=40, **XENT),
                 **_HELDOUT2),
        Workload("shapes_resnet18_bn", "shapes (32x32x3, 10 classes), ResNet-18 width 16 with "
                 "biases and affine BatchNorm, cross-entropy",
                 dict(dataset="shapes", arch="resnet18", depth=None, width=16, bias=True,
                      epochs=10, **XENT), **_HELDOUT2),
        Workload("mnist1d_cnn_d6w48", "MNIST-1D, CNN1D depth 6 width 48, cross-entropy",
                 dict(dataset="mnist1d", arch="cnn1d", depth=6, width=48, epochs=60, **XENT),
                 **_HELDOUT2),
    ),
    "imagenet": (
        _named("imagenet_resnet50", "ImageNet, ResNet-50, cross-entropy, batch 1024", "imagenet",
               "resnet50", epochs=350, train_bs=1024, test_bs=1024, **XENT),
    ),
}  # fmt: skip


def needs_data_dir(suite: str) -> bool:
    """Whether a suite reads dataset files (rather than generated or bundled data)."""
    return any(not DATASETS[w.config["dataset"]].bundled for w in SUITES[suite])
