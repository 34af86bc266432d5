"""The training program's configuration: one dataclass, each setting written once.

Every field carries its own help text; ``add_flags`` turns the fields into the command line's
flags and ``from_flags`` turns parsed flags back into a ``Config``, so a setting is declared in
one place. The names it accepts come from the registries: ``benchmarks.models.ARCHITECTURES``,
``benchmarks.data.DATASETS`` and ``benchmarks.optimizers.OPTIMIZERS``. A run saves its Config as
``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import typing
from typing import Any

from benchmarks.data import DATASETS
from benchmarks.data.text import VOCABS
from benchmarks.models import ALIASES, ARCHITECTURES
from benchmarks.optimizers import OPTIMIZERS, SCHEDULES, all_options, resolve_options
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
# Settings that do not change what is computed (a resumed run may change them; runs that differ
# only in them share their compiled programs). Every other field, including fields added later,
# is taken to change it.
INERT_FIELDS = frozenset(
    {
        "data_dir",
        "download",
        "test_bs",  # Evaluation batches: the same sums, only grouped differently.
        "workdir",
        "resume",
        "overwrite",
        "checkpoint",
        "checkpoint_every",  # Which epochs are saved; a resumed run ends the same either way.
        "compilation_cache",
        "progress",
        "samples",  # Text generated once training is over.
        "num_workers",
        "shard_params",  # Where the state lives, not what it is.
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
        "distributed_timeout",
    }
)
LOSSES = ("mse", "xent")
DTYPES = ("float32", "bfloat16", "float16")


def setting(default: Any = None, help: str | None = None, **flag: Any) -> Any:
    """A Config field and its flag. ``flag`` holds what argparse needs beyond the field's type and
    default: ``choices``, ``metavar``, ``name`` (a flag spelled otherwise, e.g. ``--no-augment``
    for a setting that defaults to True), ``show_default`` (help says the default), ``factory``."""
    factory = flag.pop("factory", None)
    metadata = {"help": help, **flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class Config:
    """Everything a run depends on. Defaults: AGD on scikit-learn's digits (no download)."""

    arch: str = setting("fcn", None, choices=ARCHS)
    depth: int | None = setting(
        3, "fcn: Linear layers; cnn1d: convs + 1; transformer: blocks", show_default=True
    )
    width: int | None = setting(
        256, "fcn: hidden width; convnets: base channels; transformer: model width",
        show_default=True,
    )  # fmt: skip
    heads: int = setting(4, "transformer: attention heads")
    context: int = setting(64, "transformer: tokens of context")
    scan_layers: bool = setting(False, "transformer: stack the blocks (nnx.scan)")
    tied: bool = setting(False, "transformer: output head = token embedding^T")
    bias: bool = setting(False, "biases and affine BatchNorm (AGD's 1-D rules)")
    dataset: str = setting("digits", "", choices=DATASETS, show_default=True)
    data_dir: str | None = setting(
        None, "folder holding the dataset files; for 'text', a text file or a folder of them"
    )
    vocab: str = setting("bytes", "text: token ids", choices=VOCABS)
    eval_windows: int | None = setting(1024, "text: validation windows")
    samples: int = setting(3, "text: generated samples")
    download: bool = setting(False, "download MNIST/CIFAR (checksum-verified)")
    train_bs: int = setting(128, "", show_default=True)
    test_bs: int = setting(512, "", show_default=True)
    epochs: int = setting(40, "", show_default=True)
    loss: str = setting("xent", "mse: one-hot * sqrt(classes) targets", choices=LOSSES)
    optimizer: str = setting("agd", None, choices=OPTIMIZERS)  # The registry: read when parsing.
    gain: float = setting(1.0, "AGD's gain (1.0: the published algorithm)")
    agd_rule: str = setting(
        DEFAULT_RULE,
        "AGD's rule for 1-D parameters and embeddings (benchmarks.rules); the default hands "
        "biases and norm parameters to Prodigy, 'library' is agd() alone",
        choices=AGD_RULES,
    )
    lr: float | None = setting(None, "baselines' peak learning rate")
    weight_decay: float = setting(0.0)
    momentum: float = setting(0.9, "sgd's momentum")
    schedule: str = setting("constant", "baselines' lr schedule", choices=SCHEDULES)
    warmup_epochs: float = setting(0.0)
    augment: bool = setting(True, "no CIFAR augmentation", name="--no-augment")
    official_normalization: bool = setting(
        False, "CIFAR: the official AGD code's mean/std (default: the training set's own)"
    )
    seed: int = setting(0, "initialisation, batch order and augmentation")
    data_seed: int | None = setting(
        None,
        "digits: its train/test split; mnist1d: the generator's seed (default: the standard "
        "split); refused for datasets with a fixed split",
    )
    workdir: str | None = setting(None, "where config, metrics, plot and checkpoints go")
    resume: bool = setting(False, "continue from the workdir's last checkpoint")
    overwrite: bool = setting(False, "replace the run already in the workdir")
    checkpoint: bool = setting(True, None, name="--no-checkpoint")
    checkpoint_every: int = setting(
        0,
        "save a verified checkpoint every N epochs (0: automatic, keeping checkpoints under "
        "about a tenth of the training time); the last epoch is always saved",
        metavar="N",
    )
    compilation_cache: bool = setting(
        True,
        "do not use JAX's persistent compilation cache (default: on, in the cache folder "
        "$AGD_OPTAX_CACHE, else $XDG_CACHE_HOME/agd_optax or ~/.cache/agd_optax)",
        name="--no-compilation-cache",
    )
    skip_nonfinite: int = setting(
        0,
        "skip up to N steps in a row whose gradients are NaN or infinite (0: stop the run)",
        metavar="N",
    )
    progress: bool = setting(True, None, name="--no-progress")
    num_workers: int = setting(4, "ImageNet decoding processes")
    image_size: int = setting(224, "ImageNet crop size")
    max_steps_per_epoch: int | None = setting(None, "cut epochs short (0: no cap)")
    validation_split: float = setting(0.0)  # Held out of train as the "test" set (tuning).
    shard_params: bool = setting(False, "FSDP: split params and state over devices")
    compute_dtype: str | None = setting(
        None,
        "default: bfloat16 on GPU/TPU, float32 on CPU (parameters stay float32)",
        choices=DTYPES,
    )
    distributed: bool = setting(False, "multi-process: jax.distributed.initialize()")
    coordinator_address: str | None = setting(None, "host:port of process 0")
    num_processes: int | None = setting(None)
    process_id: int | None = setting(None)
    distributed_timeout: int = setting(
        300,
        "seconds a process waits for the coordinator and the other processes to join before "
        "it gives up",
        show_default=True,
        metavar="S",
    )
    # The optimizer's own options (``Optimizer.options``), one flag each; defaults filled in.
    optimizer_options: dict[str, Any] = setting(factory=dict, flagless=True)

    @property
    def architecture(self):
        """The ``models.ARCHITECTURES`` entry of ``arch`` (aliases resolved)."""
        return ARCHITECTURES[ALIASES.get(self.arch, self.arch)]

    def validate(self) -> Config:
        """Checks every setting (each error names its flag) and fills in the optimizer's option
        defaults. Returns self."""

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"invalid config: {message}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            check(
                choices is None or value in choices or (value is None and f.default is None),
                f"{f.name} {value!r} is not one of {tuple(choices or ())}",  # Keys of a registry.
            )
        check(
            self.data_seed is None or DATASETS[self.dataset].seeded,
            f"dataset {self.dataset!r} has a fixed train/test split; data_seed does not apply",
        )
        task = self.architecture.task
        check(
            task == DATASETS[self.dataset].task,
            f"arch {self.arch!r} and dataset {self.dataset!r} do not fit: {self.arch!r} is for "
            f"{task}, dataset {self.dataset!r} for {DATASETS[self.dataset].task}",
        )
        arch = self.architecture
        check(
            self.loss in arch.losses,
            f"arch {self.arch!r} is trained with loss {' or '.join(map(repr, arch.losses))}",
        )
        if "heads" in arch.options:
            check(self.heads >= 1, f"heads must be >= 1, got {self.heads}")
            check(
                self.width is not None and self.width % self.heads == 0,
                f"heads={self.heads} must divide {self.width=}",
            )
        check(self.context >= 1, f"context must be >= 1, got {self.context}")
        check(
            self.eval_windows is None or self.eval_windows >= 1,
            f"eval_windows must be >= 1 or None, got {self.eval_windows}",
        )
        check(self.samples >= 0, f"samples must be >= 0, got {self.samples}")
        self._check_numbers(check)
        check(not self.resume or self.workdir is not None, "--resume needs --workdir")
        check(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        check(self.checkpoint or not self.resume, "--resume needs checkpoints (no --no-checkpoint)")
        check(
            self.agd_rule == DEFAULT_RULE or self.optimizer == "agd",
            f"agd_rule {self.agd_rule!r} applies to optimizer 'agd' only",
        )
        try:  # Fill in the defaults of the optimizer's own options, so config.json has them all.
            self.optimizer_options = resolve_options(self.optimizer, self.optimizer_options)
        except ValueError as e:
            check(False, str(e))
        self._validated_as = self.to_json()
        return self

    def ensure_valid(self) -> Config:
        """``validate()`` unless this Config was validated and has not changed since."""
        if getattr(self, "_validated_as", None) != self.to_json():
            self.validate()
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
                check(False, f"{flag_name(name)} must be {what} {lower}{upper}, got {value!r}")

        for name in ("train_bs", "test_bs", "epochs", "image_size"):
            number(name, 1, integer=True)
        number("gain", 0, low_open=True)
        number("lr", 0, low_open=True, optional=True)
        number("momentum", 0, 1, high_open=True)
        number("weight_decay", 0)
        number("warmup_epochs", 0, self.epochs)
        number("validation_split", 0, 1, high_open=True)
        number("max_steps_per_epoch", 0, integer=True, optional=True)  # 0: no cap.
        number("checkpoint_every", 0, integer=True)
        number("num_workers", 0, integer=True)
        number("skip_nonfinite", 0, integer=True)
        for name in ("seed", "data_seed"):
            number(name, 0, 2**32 - 1, integer=True, optional=name == "data_seed")
        for name in ("width", "depth"):
            number(name, 1, integer=True, optional=True)
        number("num_processes", 1, integer=True, optional=True)
        number("process_id", 0, integer=True, optional=True)
        number("distributed_timeout", 1, integer=True)
        fixed = self.architecture.fixed_depth
        check(
            fixed is None or self.depth in (None, fixed),
            f"--depth: arch {self.arch!r} has a fixed depth ({fixed}), got {self.depth}; --depth "
            f"applies to {', '.join(n for n, a in ARCHITECTURES.items() if a.fixed_depth is None)}",
        )

    def computation_key(self, *but: str) -> str:
        """The settings that decide the computation, but ``but``, as one string: runs with the
        same key build the same optimizer and programs (``optimizers.resolve`` and the steps
        reuse them in one process)."""
        values = dataclasses.asdict(self)
        return json.dumps(
            {k: v for k, v in values.items() if k not in INERT_FIELDS and k not in but},
            sort_keys=True,
        )

    def settings_digest(self, epochs_matter: bool = True) -> str:
        """SHA-256 of ``computation_key``: what a checkpoint records of the settings that made
        it (``epochs`` left out unless ``epochs_matter``: a schedule spans the epochs)."""
        key = self.computation_key() if epochs_matter else self.computation_key("epochs")
        return hashlib.sha256(key.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**values)


# --------------------------------------------------------------------------------------------------
# Flags, generated from the fields.

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def flag_name(field: str) -> str:
    """The command-line flag of a Config field (or of an optimizer option)."""
    if field in _FIELDS and "name" in _FIELDS[field].metadata:
        return _FIELDS[field].metadata["name"]
    return "--" + field.replace("_", "-")


def _value_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(Config)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, then one per optimizer option (``optimizers.all_options``).
    Flags whose default depends on the arch (``ARCH_DEFAULTS``) are left out when not given."""
    arch_dependent = {name for values in ARCH_DEFAULTS.values() for name in values}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if meta.get("flagless"):
            continue
        kwargs: dict[str, Any] = {"dest": f.name}
        help_text = meta.get("help")
        if meta.get("show_default"):
            help_text = (
                f"{help_text} (default {f.default})" if help_text else f"default {f.default}"
            )
        if help_text is not None:
            kwargs["help"] = help_text
        if _value_type(f) is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            kwargs["type"] = _value_type(f)
            for key in ("choices", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
        kwargs["default"] = argparse.SUPPRESS if f.name in arch_dependent else f.default
        parser.add_argument(flag_name(f.name), **kwargs)
    group = parser.add_argument_group("optimizer options (each for the optimizers named)")
    for name, (option, takers) in all_options().items():
        group.add_argument(
            flag_name(name),
            dest=f"opt_{name}",
            type=option.type,
            default=None,
            help=f"{option.help} (default {option.default}; {', '.join(takers)})",
        )


def from_flags(args: argparse.Namespace) -> Config:
    """The Config of parsed flags: arch-dependent defaults filled in, then validated once."""
    defaults = ARCH_DEFAULTS.get(args.arch, {})
    values = {
        name: getattr(args, name, defaults.get(name, f.default))
        for name, f in _FIELDS.items()
        if not f.metadata.get("flagless")
    }
    if ARCHITECTURES[ALIASES.get(args.arch, args.arch)].fixed_depth and "depth" not in args:
        values["depth"] = None  # Fixed by the architecture; a --depth given is checked.
    values["optimizer_options"] = {
        name: getattr(args, f"opt_{name}")
        for name in all_options()
        if getattr(args, f"opt_{name}") is not None
    }
    return Config(**values).validate()
