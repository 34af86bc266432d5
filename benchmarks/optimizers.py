"""One registry: optimizer name -> optax transformation, for AGD and every baseline."""

from __future__ import annotations

from collections.abc import Callable

import optax

import agd_optax
from benchmarks.config import Config

# The usual default peak learning rate of each baseline (used when --lr is not given).
DEFAULT_LR = {
    "sgd": 0.1,
    "adam": 1e-3,
    "adamw": 1e-3,
    "nadamw": 1e-3,
    "prodigy": 1.0,
    "dog": 1.0,
    "dadapt_adamw": 1.0,
    "cocob": 1.0,
    "schedule_free_adamw": 2.5e-3,
    "mechanize": 1e-3,
}
# Learning-rate-free optimizers: run at their defaults, their "learning rate" is a multiplier.
LR_FREE = ("agd", "prodigy", "dog", "dadapt_adamw", "cocob", "schedule_free_adamw", "mechanize")


def learning_rate(config: Config, total_steps: int, steps_per_epoch: int) -> optax.ScalarOrSchedule:
    """The baselines' learning rate: constant, cosine, or linear warmup then cosine."""
    peak = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
    if config.schedule == "constant":
        return peak
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "cosine" or warmup == 0:
        return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))


def _agd(config: Config, lr) -> optax.GradientTransformation:
    del lr
    return agd_optax.agd(config.gain)


def _sgd(config: Config, lr) -> optax.GradientTransformation:
    tx = optax.sgd(lr, momentum=config.momentum or None)
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


def _adam(config: Config, lr) -> optax.GradientTransformation:
    return optax.adam(lr)


def _adamw(config: Config, lr) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=config.weight_decay)


def _nadamw(config: Config, lr) -> optax.GradientTransformation:
    return optax.nadamw(lr, weight_decay=config.weight_decay)


def _prodigy(config: Config, lr) -> optax.GradientTransformation:
    return optax.contrib.prodigy(lr, weight_decay=config.weight_decay)


def _dog(config: Config, lr) -> optax.GradientTransformation:
    return optax.contrib.dog(lr, weight_decay=config.weight_decay or None)


def _dadapt_adamw(config: Config, lr) -> optax.GradientTransformation:
    return optax.contrib.dadapt_adamw(lr, weight_decay=config.weight_decay)


def _cocob(config: Config, lr) -> optax.GradientTransformation:
    return optax.contrib.cocob(lr, weight_decay=config.weight_decay)


def _schedule_free_adamw(config: Config, lr) -> optax.GradientTransformation:
    return optax.contrib.schedule_free_adamw(lr, weight_decay=config.weight_decay)


def _mechanize(config: Config, lr) -> optax.GradientTransformation:
    return optax.contrib.mechanize(optax.adam(lr), weight_decay=config.weight_decay)


OPTIMIZERS: dict[str, Callable[[Config, optax.ScalarOrSchedule], optax.GradientTransformation]] = {
    "agd": _agd,
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "nadamw": _nadamw,
    "prodigy": _prodigy,
    "dog": _dog,
    "dadapt_adamw": _dadapt_adamw,
    "cocob": _cocob,
    "schedule_free_adamw": _schedule_free_adamw,
    "mechanize": _mechanize,
}


def make_optimizer(
    config: Config, total_steps: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optax transformation named by ``config.optimizer``."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {config.optimizer!r}; expected one of {tuple(OPTIMIZERS)}"
        )
    lr = None if config.optimizer == "agd" else learning_rate(config, total_steps, steps_per_epoch)
    return OPTIMIZERS[config.optimizer](config, lr)


def is_schedule_free(config: Config) -> bool:
    """Schedule-free optimizers evaluate at a point other than the training iterate."""
    return config.optimizer == "schedule_free_adamw"
