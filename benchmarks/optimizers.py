"""The optimizers the programs know: one table, ``OPTIMIZERS``, name -> ``Optimizer``.

Adding an optimizer is one entry below: how to build it from the run's ``Hyper`` (learning rate,
weight decay, its own options, the model), its usual learning rate, its own command-line options,
the state scalars to log every step, and the rows it gets in the comparison's tables. The training
program (``--optimizer``, its ``--help``), ``Config.validate`` and the comparison read this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

import agd_optax
from benchmarks import rules


@dataclasses.dataclass(frozen=True)
class Option:
    """A setting of one optimizer, offered as ``--<name with dashes>`` by the training program and
    kept in ``Config.optimizer_options``."""

    name: str
    type: type
    default: Any
    help: str


@dataclasses.dataclass(frozen=True)
class Hyper:
    """What a factory gets: the run's settings, and the model's leaf roles (for AGD)."""

    lr: optax.ScalarOrSchedule | None  # None for optimizers without a learning rate.
    weight_decay: float = 0.0
    momentum: float = 0.9
    gain: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Defaults filled in.
    total_steps: int = 0  # Steps of the whole run (fixed schedules: warmup and decay).
    # AGD's leaf roles of the model, computed when called; None: inferred from parameter names.
    roles: Callable[[], Any] | None = None
    agd_rule: str = rules.DEFAULT_RULE  # AGD's rule for 1-D leaves and embeddings (rules.py).


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the comparison's tables (``benchmarks.compare``)."""

    label: str  # "" for the optimizer's own name.
    description: str
    gain: float = 1.0
    grid: tuple[float, ...] = ()  # Learning rates tuned over; empty: run at its defaults.
    options: tuple[tuple[str, Any], ...] = ()  # The optimizer's own options for this row.


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One optimizer: its factory and everything the programs need to know about it."""

    build: Callable[[Hyper], optax.GradientTransformation]
    description: str
    default_lr: float | None = None  # Peak learning rate without --lr; None: takes none.
    agd_init: bool = False  # Start from AGD's scaled orthogonal initialisation.
    logged: tuple[str, ...] = ()  # State fields (optax.tree.get names) logged every step.
    options: tuple[Option, ...] = ()
    compare: tuple[Row, ...] = ()
    # Schedule-free: (opt_state, params) -> the parameters to evaluate.
    eval_params: Callable[[Any, Any], Any] | None = None
    schedule_spans_run: bool = False  # Its own schedule over the run's total steps.

    @property
    def takes_lr(self) -> bool:
        return self.default_lr is not None

    def epochs_matter(self, config: Any) -> bool:
        """Whether the number of epochs enters the computation (a schedule over the whole run),
        so that a resumed run may not change it."""
        return self.schedule_spans_run or (self.takes_lr and config.schedule != "constant")


def _roles(hyper: Hyper):
    return None if hyper.roles is None else hyper.roles()


def _sgd(h: Hyper) -> optax.GradientTransformation:
    tx = optax.sgd(h.lr, momentum=h.momentum or None)
    if h.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(h.weight_decay), tx)
    return tx


def _wd(factory: Callable[..., optax.GradientTransformation]) -> Callable[[Hyper], Any]:
    """A builder calling ``factory(lr, weight_decay=...)``."""
    return lambda h: factory(h.lr, weight_decay=h.weight_decay)


def _tuned(description: str, grid: tuple[float, ...]) -> tuple[Row, ...]:
    return (Row("", description, grid=grid),)


def _defaults(title: str) -> tuple[Row, ...]:
    return (Row("", f"{title}, defaults"),)


def _adam_with_eps_root(learning_rate, b1, b2):
    """Adam with a tiny ``eps_root``: its square root stays differentiable where a gradient is
    exactly zero, so the hypergradient of its betas is finite."""
    return optax.adam(learning_rate, b1, b2, eps_root=1e-16)


def _hypergradient(base, **initial: float) -> Callable[[Hyper], optax.GradientTransformation]:
    """A builder of ``base`` whose hyperparameters a tower of ``hyper_height`` SGD levels learns,
    from ``--lr`` and ``initial``; height 0 keeps them fixed (and logged, through
    ``inject_hyperparams``)."""

    def build(h: Hyper) -> optax.GradientTransformation:
        if callable(h.lr):
            raise ValueError(
                "hypergradient optimizers learn their step size: use --schedule constant"
            )
        height = h.options["hyper_height"]
        if height == 0:
            return optax.inject_hyperparams(base)(learning_rate=h.lr, **initial)
        return agd_optax.hypergradient_tower(
            base, height, hyper_learning_rate=h.options["hyper_lr"], learning_rate=h.lr, **initial
        )

    return build


HYPER_OPTIONS = (
    Option("hyper_height", int, 1, "hypergradient: tower height (0: fixed hyperparameters)"),
    Option("hyper_lr", float, 1e-5, "hypergradient: step size of the first hyper level"),
)
HYPER = "step size learned online by hypergradient descent; --lr: the initial step"
# Chandra et al.'s implementation's defaults: SGD from 0.01, Adam from 0.001, hyper-step 1e-5.
HYPER_ROW = "{}, {} from {}, hyper-step 1e-5, tower of height {}"

SGD_GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LR_FREE = "learning-rate free; --lr multiplies"
contrib = optax.contrib

# name: Optimizer(build, description, default_lr, ...); a Row label "" is the optimizer's name.
OPTIMIZERS: dict[str, Optimizer] = {
    "agd": Optimizer(
        lambda h: (
            agd_optax.agd(h.gain)
            if h.roles is None
            else rules.agd_transformation(h.agd_rule, h.gain, h.roles())
        ),
        "Automatic Gradient Descent (--gain; no learning rate)",
        agd_init=True,
        logged=("eta",),
        compare=(
            Row("agd", "AGD, gain 1 (the published algorithm, no setting)"),
            Row("agd_gain10", "AGD, gain 10", gain=10.0),
        ),
    ),
    "sgd": Optimizer(_sgd, "SGD (--momentum, --weight-decay)", 0.1,
                     compare=(Row("sgd_momentum", "SGD, momentum 0.9, tuned lr", grid=SGD_GRID),)),
    "adam": Optimizer(lambda h: optax.adam(h.lr), "Adam", 1e-3,
                      compare=_tuned("Adam, tuned lr", ADAM_GRID)),
    "adamw": Optimizer(_wd(optax.adamw), "AdamW", 1e-3),
    "nadamw": Optimizer(_wd(optax.nadamw), "NadamW", 1e-3,
                        compare=_tuned("NadamW (weight decay 0), tuned lr", ADAM_GRID)),
    "prodigy": Optimizer(_wd(contrib.prodigy), f"Prodigy ({LR_FREE})", 1.0,
                         compare=_defaults("Prodigy")),
    "dog": Optimizer(lambda h: contrib.dog(h.lr, weight_decay=h.weight_decay or None),
                     f"DoG ({LR_FREE})", 1.0, compare=_defaults("DoG")),
    "dadapt_adamw": Optimizer(_wd(contrib.dadapt_adamw), f"D-Adaptation AdamW ({LR_FREE})", 1.0,
                              compare=_defaults("D-Adaptation AdamW")),
    "cocob": Optimizer(_wd(contrib.cocob), f"COCOB ({LR_FREE})", 1.0, compare=_defaults("COCOB")),
    "mechanize": Optimizer(
        lambda h: contrib.mechanize(optax.adam(h.lr), weight_decay=h.weight_decay),
        "Mechanic on Adam (learning-rate free)", 1e-3, compare=_defaults("Mechanic on Adam")),
    "schedule_free_adamw": Optimizer(
        _wd(contrib.schedule_free_adamw), "Schedule-free AdamW (evaluated at its averaged point)",
        2.5e-3, compare=_defaults("Schedule-free AdamW"),
        eval_params=contrib.schedule_free_eval_params),
    "hypergradient-sgd": Optimizer(
        _hypergradient(optax.sgd), f"SGD, {HYPER}", 0.01, logged=("learning_rate",),
        options=HYPER_OPTIONS,
        compare=(
            Row("hypergradient_sgd", HYPER_ROW.format("SGD", "step size", 0.01, 1)),
            Row("hypergradient_sgd_h3", HYPER_ROW.format("SGD", "step size", 0.01, 3),
                options=(("hyper_height", 3),)),
        )),
    "hypergradient-adam": Optimizer(
        _hypergradient(_adam_with_eps_root, b1=0.9, b2=0.999), f"Adam, {HYPER} (betas too)", 1e-3,
        logged=("learning_rate", "b1", "b2"), options=HYPER_OPTIONS,
        compare=(Row("hypergradient_adam", HYPER_ROW.format("Adam", "step and betas", 0.001, 1)),)),
}  # fmt: skip


MUON_RMS = 0.2  # Muon's step scaled to AdamW's update RMS (Liu et al. 2025, arXiv:2502.16982).


def muon_dimension_numbers(roles: Any, params: Any) -> Any:
    """Which leaves Muon orthogonalises, from the model's AGD roles: every dense weight (an
    attention projection as the matrix from its fan-in axes to its fan-out axes) and every
    convolution kernel (its kernel positions folded into the fan-in, as in Jordan et al.'s CIFAR-10
    runs; stacked layers each on its own), but not the output head (a leaf under a ``head``
    module) nor embeddings, biases and norm parameters: those go to Adam, as Muon's authors
    prescribe (Jordan et al. 2024). None marks a leaf for Adam."""

    def names(path) -> tuple[str, ...]:
        keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        return tuple(str(k) for k in keys if str(k) != "value")

    is_role = lambda x: x is None or isinstance(x, agd_optax.Role)  # noqa: E731
    by_path = {
        names(path): role
        for path, role in jax.tree_util.tree_flatten_with_path(roles, is_leaf=is_role)[0]
    }

    def spec(path, leaf):
        keys = names(path)
        role = by_path.get(keys)
        if role is None or role.kind not in ("dense", "conv") or "head" in keys:
            return None
        reduction = role.in_axes
        if role.kind == "conv":
            ndim = len(leaf.shape)
            named = {a % ndim for a in (*role.in_axes, *role.out_axes, *role.stack_axes)}
            spatial = role.spatial_axes
            if spatial is None:
                spatial = tuple(a for a in range(ndim) if a not in named)
            reduction = (*spatial, *role.in_axes)
        return contrib.MuonDimensionNumbers(reduction, role.out_axes)

    return jax.tree_util.tree_map_with_path(spec, params)


def _muon(h: Hyper) -> optax.GradientTransformation:
    """``optax.contrib.muon`` at one learning rate: Muon (momentum 0.95, Nesterov, 5 Newton-Schulz
    steps) on the hidden weight matrices, its step scaled to AdamW's RMS (``consistent_rms``) so
    that one learning rate serves both parts; Adam (betas 0.9, 0.999) on every other leaf."""
    dims = None if h.roles is None else lambda params: muon_dimension_numbers(h.roles(), params)
    return contrib.muon(h.lr, weight_decay=h.weight_decay, adam_weight_decay=h.weight_decay,
                        consistent_rms=MUON_RMS, muon_weight_dimension_numbers=dims)  # fmt: skip


ALGOPERF_NADAMW_PEAK = 0.0017486387539278373


def algoperf_nadamw_schedule(total_steps: int) -> optax.Schedule:
    """The AlgoPerf self-tuning NadamW baseline's schedule: linear warmup from 0 over 2% of the
    run, then cosine decay to 0 at its end."""
    warmup = int(0.02 * total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, ALGOPERF_NADAMW_PEAK, warmup),
            optax.cosine_decay_schedule(ALGOPERF_NADAMW_PEAK, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def _algoperf_nadamw(h: Hyper) -> optax.GradientTransformation:
    """NadamW with the AlgoPerf self-tuning baseline's settings and schedule: the full-budget
    self-tuning baseline of mlcommons/algorithmic-efficiency
    (reference_algorithms/qualification_baselines/self_tuning/jax_nadamw_full_budget.py)."""
    return optax.nadamw(algoperf_nadamw_schedule(h.total_steps), b1=1.0 - 0.06733926164,
                        b2=0.9955159689799007, eps=1e-8,
                        weight_decay=0.08121616522670176)  # fmt: skip


def _algoperf_schedule_free(h: Hyper) -> optax.GradientTransformation:
    """Schedule-free AdamW with the settings of the AlgoPerf self-tuning track's winning
    submission: lr 0.0025, b1 0.9, b2 0.99552, weight decay 0.0812, warmup over 2% of the run."""
    return contrib.schedule_free_adamw(0.0025, warmup_steps=int(0.02 * h.total_steps), b1=0.9,
                                       b2=0.99552, weight_decay=0.0812)  # fmt: skip


OPTIMIZERS.update({
    "muon": Optimizer(
        _muon,
        "Muon (optax.contrib.muon): orthogonalised momentum on hidden weight matrices (and conv "
        "kernels, positions folded into the fan-in), at AdamW's update RMS; Adam on embeddings, "
        "the output head, biases and norms, at the same learning rate",
        0.003),
    "agd_momentum": Optimizer(
        lambda h: agd_optax.agd_momentum(h.gain, roles=_roles(h)),
        "AGD with momentum: AGD's step along the average of recent gradients (--gain; no "
        "learning rate)",
        agd_init=True, logged=("eta",),
        compare=(Row("agd_momentum", "AGD with momentum 0.9 (no setting)"),)),
    "schedule_free_adamw_algoperf": Optimizer(
        _algoperf_schedule_free, "Schedule-free AdamW, AlgoPerf self-tuning winner's settings",
        schedule_spans_run=True,
        compare=(Row("schedule_free_adamw_algoperf", "Schedule-free AdamW, AlgoPerf settings"),),
        eval_params=contrib.schedule_free_eval_params),
    "nadamw_algoperf": Optimizer(
        _algoperf_nadamw, "NadamW, AlgoPerf self-tuning baseline's settings and schedule",
        schedule_spans_run=True,
        compare=(Row("nadamw_algoperf", "NadamW, AlgoPerf baseline settings and schedule"),)),
})  # fmt: skip


def resolve(
    spec: Optimizer,
    config: Any,
    total_steps: int,
    steps_per_epoch: int,
    roles: Callable[[], Any] | None,
) -> optax.GradientTransformation:
    """The transformation of registry entry ``spec`` for a run of ``config``: its learning rate
    and schedule, its own options, AGD's rule, ``roles`` (a callable giving the model's leaf
    roles, asked only by the optimizers that use them) and, with ``config.skip_nonfinite``,
    ``optax.apply_if_finite`` around it."""
    lr = None
    if spec.takes_lr:
        peak = spec.default_lr if config.lr is None else config.lr
        warmup = int(config.warmup_epochs * steps_per_epoch)
        lr = learning_rate(peak, config.schedule, warmup, total_steps)
    hyper = Hyper(
        lr=lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        gain=config.gain,
        options=config.optimizer_options,  # Complete: Config.validate filled in the defaults.
        roles=roles,
        total_steps=total_steps,
        agd_rule=config.agd_rule,
    )
    tx = spec.build(hyper)
    if config.skip_nonfinite:
        tx = optax.apply_if_finite(tx, config.skip_nonfinite)
    return tx


def get(name: str) -> Optimizer:
    """The registry entry of ``name``, or a ValueError naming the known ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {tuple(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every optimizer option by name, with the optimizers that take it (an option shared by
    several optimizers must be declared the same way by each)."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for name, spec in OPTIMIZERS.items():
        for opt in spec.options:
            if opt.name in out and out[opt.name][0] != opt:
                raise ValueError(f"option {opt.name!r} is declared differently by {name!r}")
            out.setdefault(opt.name, (opt, []))[1].append(name)
    return out


def resolve_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with the defaults of optimizer ``name``'s options filled in; a ValueError for an
    option it does not take."""
    spec = get(name)
    known = {o.name: o for o in spec.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        takes = ", ".join(known) or "none"
        raise ValueError(f"optimizer {name!r} has no option {unknown} (its options: {takes})")
    return {k: given.get(k, o.default) for k, o in known.items()}


def learning_rate(
    peak: float, schedule: str, warmup_steps: int, total_steps: int
) -> optax.ScalarOrSchedule:
    """Constant, cosine, or linear warmup then cosine."""
    if schedule == "constant":
        return peak
    if schedule == "cosine" or warmup_steps == 0:
        return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1)
    )


SCHEDULES = ("constant", "cosine", "warmup_cosine")
