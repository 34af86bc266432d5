"""The evidence suite's language-model table: tuning and reporting on losses (lower is better),
and the tuning runs' held-out part of the training text."""

import math

import numpy as np
import pytest

from benchmarks import compare
from benchmarks.compare import Entry, Workload
from benchmarks.compare.report import markdown
from benchmarks.compare.workloads import LM_ENTRIES, SUITES
from benchmarks.data.text import tokenize
from benchmarks.task import text_validation_split


def _grid_record(lr, val_loss, val_accuracy=0.5):
    return dict(lr=lr, split="validation", val_accuracy=val_accuracy, val_loss=val_loss)


def test_select_lr_on_loss_takes_the_lowest_validation_loss():
    records = [_grid_record(1e-3, 2.0, 0.9), _grid_record(3e-3, 1.5, 0.1), _grid_record(1e-2, 1.8)]
    assert compare.select_lr(records, "loss") == 3e-3
    assert compare.select_lr(records) == 1e-3  # Accuracy, the default, would pick another.
    diverged = [_grid_record(1e-1, math.nan), _grid_record(1e-2, 3.0)]
    assert compare.select_lr(diverged, "loss") == 1e-2
    with pytest.raises(ValueError, match="metric"):
        compare.select_lr(records, "perplexity")


def test_steps_to_target_when_lower_is_better():
    rows = [{"epoch": e, "test_loss": v} for e, v in zip(range(1, 5), (3.0, 2.5, None, 2.0))]
    assert compare.steps_to_target(rows, 2.5, 10, "test_loss", lower_is_better=True) == 20
    assert compare.steps_to_target(rows, 2.2, 10, "test_loss", lower_is_better=True) == 40
    assert compare.steps_to_target(rows, 1.0, 10, "test_loss", lower_is_better=True) is None


class _LossRunner:
    """Validation loss lowest at lr 3e-3, test loss the same for every lr."""

    def run(self, workload, entry, lr, seed, validation):
        prefix = "val" if validation else "test"
        loss = 2.0 + abs(math.log10((lr or 3e-3) / 3e-3)) if validation else 2.0 + 0.1 * seed
        curve = [{"epoch": e, f"{prefix}_loss": loss + 1.0 / e} for e in range(1, 4)]
        return {
            "split": "validation" if validation else "test",
            "lr": lr,
            "seed": seed,
            "steps": 30,
            "steps_per_epoch": 10,
            "wall_s": 1.0,
            f"{prefix}_accuracy": 0.3,
            f"{prefix}_loss": curve[-1][f"{prefix}_loss"],
            "curve": curve,
        }


def test_a_loss_cell_is_tuned_summarised_and_tabled():
    workload = Workload("w", "tiny LM", dict(dataset="pystdlib"), metric="loss")
    entry = Entry("adamw_warmup_cosine", "adamw", grid=(1e-3, 3e-3, 1e-2), schedule="warmup_cosine")
    agd = Entry("agd", "agd")
    cells = [compare.run_cell(_LossRunner(), workload, e, seeds=[0, 1]) for e in (agd, entry)]
    assert cells[1]["chosen_lr"] == {"0": 3e-3, "1": 3e-3}
    summary = compare.summarize(cells, "loss")
    best = 2.0 + 0.05 + 1.0 / 3  # Mean over seeds 0 and 1 of the final test loss.
    assert summary["best_mean_loss"] == pytest.approx(best)
    assert summary["target_loss"] == pytest.approx(best / 0.95)
    adamw = summary["cells"][1]
    assert adamw["total_steps"] == 3 * 30 + 2 * 30
    assert adamw["steps_to_target"] == 25  # Seed 0 at epoch 2, seed 1 at epoch 3.
    result = {
        "meta": dict(
            command="cmd", hardware="hw", jax="j", optax="o", seeds=2, grid_description="g"
        ),
        "workloads": [
            dict(
                title="tiny LM",
                metric="loss",
                epochs=3,
                steps_per_epoch=10,
                train_bs=4,
                cells=cells,
                summary=summary,
            )
        ],
    }
    table = markdown("lm", result)
    assert "| validation loss | loss after epoch 1 |" in table
    assert "| adamw_warmup_cosine | 0.003 |" in table


def test_the_lm_suite_tunes_adamw_with_warmup_cosine_and_runs_lr_free_at_defaults():
    (workload,) = SUITES["lm"]
    assert workload.metric == "loss" and workload.config["arch"] == "transformer"
    tuned = [e for e in LM_ENTRIES if e.tuned]
    assert [(e.optimizer, e.schedule) for e in tuned] == [("adamw", "warmup_cosine")]
    labels = {e.label for e in LM_ENTRIES}
    assert {"agd", "prodigy", "dog", "dadapt_adamw", "cocob", "mechanize"} <= labels
    # Held out from the choice of agd_momentum, against the AlgoPerf one-configuration entries.
    assert {"agd_momentum", "schedule_free_adamw_algoperf", "nadamw_algoperf"} <= labels


def test_tuning_runs_hold_out_the_end_of_the_training_text():
    data = tokenize(bytes(range(100)), name="t", source="mem", valid_fraction=0.1)
    held = text_validation_split(data, 0.2)
    np.testing.assert_array_equal(held.train, np.arange(72))
    np.testing.assert_array_equal(held.valid, np.arange(72, 90))  # The real validation unseen.
