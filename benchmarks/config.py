"""The training program's configuration: one dataclass, saved as JSON with every run.

The names it accepts come from the registries: ``benchmarks.models.ARCHITECTURES``,
``benchmarks.data.DATASETS`` and ``benchmarks.optimizers.OPTIMIZERS``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from benchmarks.data import DATASETS
from benchmarks.data.text import VOCABS
from benchmarks.models import ALIASES, ARCHITECTURES
from benchmarks.optimizers import OPTIMIZERS, SCHEDULES, resolve_options
from benchmarks.rules import AGD_RULES, DEFAULT_RULE

ARCHS = (*ARCHITECTURES, *ALIASES)
# What the transformer changes in the defaults (a small byte-level LM that trains in minutes on a
# CPU); flags given on the command line win.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer": dict(
        dataset="pystdlib",
        depth=2,
        width=128,
        train_bs=32,
        test_bs=64,
        epochs=10,
        max_steps_per_epoch=100,
    ),
}
LOSSES = ("mse", "xent")


@dataclasses.dataclass
class Config:
    """Everything a run depends on. Defaults: AGD on scikit-learn's digits (no download)."""

    arch: str = "fcn"
    depth: int | None = 3  # fcn: number of Linear layers; cnn1d: convs + 1; fixed for vgg/resnet.
    width: int | None = 256  # fcn: hidden width; cnn1d/vgg/resnet: base channels (None = default).
    bias: bool = False  # biases and affine BatchNorm (AGD then uses its 1-D rules).
    heads: int = 4  # transformer: attention heads.
    context: int = 64  # transformer: tokens read per prediction (the model's context).
    scan_layers: bool = False  # transformer: stacked blocks applied with nnx.scan.
    tied: bool = False  # transformer: the output head is the token embedding transposed.
    dataset: str = "digits"
    data_dir: str | None = None  # For "text": a text file or a folder of them.
    vocab: str = "bytes"  # Text: "bytes" (256 ids) or "compact" (the byte values that occur).
    eval_windows: int | None = 1024  # Text: validation windows (evenly spaced); None = all.
    samples: int = 3  # Text: generated samples written to the run folder.
    download: bool = False
    train_bs: int = 128
    test_bs: int = 512
    epochs: int = 40
    loss: str = "xent"
    optimizer: str = "agd"
    optimizer_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # Its own options.
    gain: float = 1.0  # AGD only.
    agd_rule: str = DEFAULT_RULE  # AGD only: its rule for 1-D leaves and embeddings (rules.py).
    lr: float | None = None  # baselines: peak learning rate (None = the optimizer's usual default).
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only.
    schedule: str = "constant"  # baselines' learning-rate schedule.
    warmup_epochs: float = 0.0
    augment: bool = True  # CIFAR: random crop with padding and flip.
    official_normalization: bool = False  # CIFAR: the official AGD code's mean/std values.
    seed: int = 0  # Initialisation, batch order and augmentation.
    data_seed: int | None = None  # The split of digits, the draw of MNIST-1D; None: standard.
    workdir: str | None = None
    resume: bool = False
    overwrite: bool = False  # a new run may replace the run files already in workdir.
    checkpoint: bool = True  # orbax checkpoint after every epoch (needs workdir).
    progress: bool = True  # a progress bar per epoch.
    num_workers: int = 4  # ImageNet decoding processes.
    image_size: int = 224  # ImageNet crop size.
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests).
    skip_nonfinite: int = 0  # skip up to this many non-finite steps in a row (0: stop at one).
    validation_split: float = 0.0  # hold out this fraction of train as the "test" set (tuning;
    # for text, the last fraction of the training tokens, in place of the validation split).
    shard_params: bool = False  # FSDP: split parameters and optimizer state over the devices.
    compute_dtype: str | None = None  # None: bfloat16 on accelerators, float32 on CPU.
    distributed: bool = False  # call jax.distributed.initialize() (multi-process runs).
    coordinator_address: str | None = None  # host:port of process 0 (None: auto-detect).
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> Config:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"invalid config: {message}")

        check(self.arch in ARCHS, f"arch {self.arch!r} is not one of {ARCHS}")
        check(
            self.dataset in DATASETS,
            f"dataset {self.dataset!r} is not one of {tuple(DATASETS)}",
        )
        check(
            self.data_seed is None or DATASETS[self.dataset].seeded,
            f"dataset {self.dataset!r} has a fixed train/test split; data_seed does not apply",
        )
        task = ARCHITECTURES[ALIASES.get(self.arch, self.arch)].task
        check(
            task == DATASETS[self.dataset].task,
            f"arch {self.arch!r} and dataset {self.dataset!r} do not fit: {self.arch!r} is for "
            f"{task}, dataset {self.dataset!r} for {DATASETS[self.dataset].task}",
        )
        if task == "language":
            check(
                self.depth is not None and self.depth >= 1 and self.width is not None,
                f"the transformer needs depth >= 1 and a width, got {self.depth}, {self.width}",
            )
            check(self.heads >= 1, f"heads must be >= 1, got {self.heads}")
            check(self.width % self.heads == 0, f"heads={self.heads} must divide {self.width=}")
            check(self.context >= 1, f"context must be >= 1, got {self.context}")
            check(self.loss == "xent", "the transformer is trained with loss 'xent'")
            check(self.vocab in VOCABS, f"vocab {self.vocab!r} is not one of {VOCABS}")
            check(
                self.eval_windows is None or self.eval_windows >= 1,
                f"eval_windows must be >= 1 or None, got {self.eval_windows}",
            )
            check(self.samples >= 0, f"samples must be >= 0, got {self.samples}")
        check(self.loss in LOSSES, f"loss {self.loss!r} is not one of {LOSSES}")
        check(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        self._check_numbers(check)
        check(not self.resume or self.workdir is not None, "--resume needs --workdir")
        check(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        check(self.checkpoint or not self.resume, "--resume needs checkpoints (no --no-checkpoint)")
        check(
            self.compute_dtype in (None, "float32", "bfloat16", "float16"),
            f"compute_dtype {self.compute_dtype!r} is not float32, bfloat16 or float16",
        )
        check(self.agd_rule in AGD_RULES, f"agd_rule {self.agd_rule!r} is not one of {AGD_RULES}")
        check(
            self.agd_rule == DEFAULT_RULE or self.optimizer == "agd",
            f"agd_rule {self.agd_rule!r} applies to optimizer 'agd' only",
        )
        check(
            self.optimizer in OPTIMIZERS,
            f"optimizer {self.optimizer!r} is not one of {tuple(OPTIMIZERS)}",
        )
        try:  # Fill in the defaults of the optimizer's own options, so config.json has them all.
            self.optimizer_options = resolve_options(self.optimizer, self.optimizer_options)
        except ValueError as e:
            check(False, str(e))
        return self

    def _check_numbers(self, check) -> None:
        """Every number in range, each error naming its flag (NaN and infinities refused)."""

        def number(name: str, low: float, high: float = math.inf, **kw) -> None:
            value = getattr(self, name)
            if value is None and kw.get("optional"):
                return
            integer = kw.get("integer", False)
            ok = isinstance(value, int) if integer else isinstance(value, int | float)
            ok = ok and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if kw.get("low_open") else value >= low)
            ok = ok and (value < high if kw.get("high_open") else value <= high)
            if not ok:
                lower = ("> " if kw.get("low_open") else ">= ") + str(low)
                upper = (
                    "" if high == math.inf else (" and < " if kw.get("high_open") else " and <= ")
                )
                upper += "" if high == math.inf else str(high)
                what = "an integer" if integer else "a finite number"
                flag = "--" + name.replace("_", "-")
                check(False, f"{flag} must be {what} {lower}{upper}, got {value!r}")

        for name in ("train_bs", "test_bs", "epochs", "image_size"):
            number(name, 1, integer=True)
        number("gain", 0, low_open=True)
        number("lr", 0, low_open=True, optional=True)
        number("momentum", 0, 1, high_open=True)
        number("weight_decay", 0)
        number("warmup_epochs", 0, self.epochs)
        number("validation_split", 0, 1, high_open=True)
        number("max_steps_per_epoch", 0, integer=True, optional=True)  # 0: no cap.
        number("num_workers", 0, integer=True)
        number("skip_nonfinite", 0, integer=True)
        for name in ("seed", "data_seed"):
            number(name, 0, 2**32 - 1, integer=True, optional=name == "data_seed")
        for name in ("width", "depth"):
            number(name, 1, integer=True, optional=True)
        number("num_processes", 1, integer=True, optional=True)
        number("process_id", 0, integer=True, optional=True)
        fixed = ARCHITECTURES[ALIASES.get(self.arch, self.arch)].fixed_depth
        check(
            fixed is None or self.depth in (None, fixed),
            f"--depth: arch {self.arch!r} has a fixed depth ({fixed}), got {self.depth}; --depth "
            f"applies to {', '.join(n for n, a in ARCHITECTURES.items() if a.fixed_depth is None)}",
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**values)
