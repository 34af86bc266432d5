"""The evidence suite (benchmarks.compare): learning-rate selection, steps-to-target, compute
accounting, and a quick digits run that writes the table, the plots and the JSON."""

import json
import math

import pytest

from benchmarks import compare
from benchmarks.compare import Entry, Workload


def _grid_record(lr, val_accuracy, val_loss=1.0, **extra):
    return dict(lr=lr, split="validation", val_accuracy=val_accuracy, val_loss=val_loss, **extra)


def test_select_lr_picks_the_best_validation_accuracy_and_ignores_anything_else():
    records = [
        # Bait: fields a careless selection might read point at 0.1 everywhere.
        _grid_record(0.01, 0.90, test_accuracy=0.99, accuracy=0.99),
        _grid_record(0.03, 0.95, test_accuracy=0.50, accuracy=0.50),
        _grid_record(0.1, 0.80, test_accuracy=1.00, accuracy=1.00),
    ]
    assert compare.select_lr(records) == 0.03


def test_select_lr_refuses_records_that_are_not_validation_runs():
    records = [_grid_record(0.01, 0.9), dict(lr=0.1, split="test", val_accuracy=1.0, val_loss=0.0)]
    with pytest.raises(ValueError, match="validation"):
        compare.select_lr(records)
    with pytest.raises(ValueError, match="validation"):  # A record without a split: refused too.
        compare.select_lr([dict(lr=0.1, val_accuracy=1.0, val_loss=0.0)])
    with pytest.raises(ValueError):
        compare.select_lr([])


def test_select_lr_ties_and_diverged_runs():
    tie = [_grid_record(0.1, 0.9, 0.5), _grid_record(0.01, 0.9, 0.3), _grid_record(0.03, 0.9, 0.3)]
    assert compare.select_lr(tie) == 0.01  # Lower loss first, then the smaller learning rate.
    diverged = [_grid_record(1.0, math.nan, math.nan), _grid_record(0.1, 0.2, 2.0)]
    assert compare.select_lr(diverged) == 0.1


def test_a_run_stopped_by_a_non_finite_loss_is_a_nan_record_not_a_crash(tmp_path, monkeypatch):
    from benchmarks import run as training
    from benchmarks.compare.runner import Runner

    def diverge(config, workdir):
        raise training.NonFiniteError("the loss became NaN", steps=7, steps_per_epoch=25)

    monkeypatch.setattr(training, "train_and_evaluate", diverge)
    workload = compare.SUITES["digits"][0]
    sgd = next(e for e in compare.ENTRIES if e.label == "sgd_momentum")
    record = Runner(str(tmp_path), {}).run(workload, sgd, 0.3, 0, validation=True)
    assert math.isnan(record["val_accuracy"]) and math.isnan(record["val_loss"])
    assert record["steps"] == 7 and "NaN" in record["diverged"]
    assert compare.select_lr([record, _grid_record(0.03, 0.5)]) == 0.03  # Ranked last.


def test_steps_to_target_on_a_hand_made_curve():
    rows = [
        {"epoch": 1, "test_accuracy": 0.50},
        {"epoch": 2, "test_accuracy": 0.80},
        {"epoch": 3, "test_accuracy": None},  # A missing value is skipped, not a crash.
        {"epoch": 4, "test_accuracy": 0.93},
        {"epoch": 5, "test_accuracy": 0.91},
    ]
    assert compare.steps_to_target(rows, 0.80, steps_per_epoch=10) == 20  # Reached exactly.
    assert compare.steps_to_target(rows, 0.92, steps_per_epoch=10) == 40
    assert compare.steps_to_target(rows, 0.95, steps_per_epoch=10) is None
    assert compare.steps_to_target(rows, 0.0, steps_per_epoch=7) == 7
    val = [{"epoch": 1, "val_accuracy": 0.9}]
    assert compare.steps_to_target(val, 0.5, 3, key="val_accuracy") == 3


def test_mean_std_and_grid_parsing():
    assert compare.mean_std([0.9]) == (0.9, 0.0)
    mean, std = compare.mean_std([0.8, 1.0])
    assert mean == pytest.approx(0.9) and std == pytest.approx(math.sqrt(0.02))
    assert compare.parse_grid(None) is None
    assert compare.parse_grid("3") == 3
    with pytest.raises(ValueError, match="at least 1 point"):
        compare.parse_grid("0")
    assert compare.parse_grid("1e-3, 1e-2") == (1e-3, 1e-2)
    with pytest.raises(ValueError):
        compare.parse_grid("-1,2")
    assert compare.grid_points(1e-4, 1e-2, 3) == (1e-4, 1e-3, 1e-2)
    entries = {e.label: e for e in compare.entries_for(2, None, "digits")}
    assert entries["adam"].grid == (1e-4, 1e-2) and entries["agd"].grid == ()
    assert entries["sgd_momentum"].tuned and not entries["prodigy"].tuned
    # ImageNet has no held-out split: the baselines run untuned at one fixed learning rate.
    imagenet = {e.label: e for e in compare.entries_for(None, None, "imagenet")}
    assert imagenet["sgd_momentum"].grid == (0.1,) and not imagenet["sgd_momentum"].tuned
    with pytest.raises(ValueError, match="unknown"):
        compare.entries_for(None, ["nope"], "digits")
    # A grid on an optimizer that takes no learning rate has no fixed point to fall back on.
    no_lr = compare.Entry("agd_grid", "agd", grid=(0.5, 2.0))
    with pytest.raises(ValueError, match="'agd_grid'.*takes no learning rate"):
        compare.entries_for(None, None, "imagenet", [no_lr])


class _FakeRunner:
    """Stands in for training: validation accuracy peaks at a seed-dependent learning rate, test
    accuracy at another, so a selection that looked at test would be caught."""

    def __init__(self):
        self.calls = []

    def run(self, workload, entry, lr, seed, validation):
        self.calls.append((lr, seed, validation))
        best_val = {0: 0.01, 1: 0.1, 2: 0.01}[seed]
        prefix = "val" if validation else "test"
        accuracy = 0.9 - abs(math.log10(lr / best_val)) / 10 if validation else 0.5
        return {
            "split": "validation" if validation else "test",
            "lr": lr,
            "seed": seed,
            "steps": 100 if validation else 125,
            "steps_per_epoch": 25,
            "wall_s": 1.0,
            f"{prefix}_accuracy": accuracy,
            f"{prefix}_loss": 1.0 - accuracy,
            "curve": [{"epoch": e, f"{prefix}_accuracy": accuracy} for e in range(1, 6)],
        }


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_run_cell_tunes_once_on_validation(dataset):
    runner = _FakeRunner()
    workload = Workload("w", "w", dict(dataset=dataset))
    entry = Entry("sgd_momentum", "sgd", grid=(0.001, 0.01, 0.1))
    cell = compare.run_cell(runner, workload, entry, seeds=[0, 1, 2])
    # One grid, on seed 0 (the split is the data seed's, the same for every seed).
    assert [(lr, seed) for lr, seed, validation in runner.calls if validation] == [
        (0.001, 0),
        (0.01, 0),
        (0.1, 0),
    ]
    assert all(r["split"] == "validation" for r in cell["grid_runs"])
    assert all(r["split"] == "test" for r in cell["final_runs"])
    assert cell["chosen_lr"] == {"0": 0.01, "1": 0.01, "2": 0.01}
    finals = [(lr, seed) for lr, seed, validation in runner.calls if not validation]
    assert finals == [(0.01, s) for s in (0, 1, 2)]
    summary = compare.summarize([cell])["cells"][0]
    assert summary["total_steps"] == 100 * 3 + 125 * 3
    assert summary["grid_runs"] == 3 and summary["total_wall_s"] == 3 + 3


def test_table_rows_come_from_the_optimizer_registry():
    from benchmarks.optimizers import OPTIMIZERS

    labels = [e.label for e in compare.ENTRIES]
    assert labels[:3] == ["agd", "agd_gain10", "sgd_momentum"]
    for e in compare.ENTRIES:
        assert e.optimizer in OPTIMIZERS
        # A tuned row is an optimizer with a learning rate; an lr-free one runs at its default.
        assert not e.tuned or OPTIMIZERS[e.optimizer].takes_lr


@pytest.mark.slow  # notebooks/comparison.ipynb runs the same command line end to end in the suite.
def test_quick_digits_suite_writes_table_plots_and_json(tmp_path):
    out = tmp_path / "results"
    argv = ["--suite", "digits", "--quick", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    argv += ["--optimizers", "agd,sgd_momentum,cocob"]
    assert compare.main(argv) == 0
    table = (out / "digits.md").read_text()
    assert "| agd | none (gain 1) |" in table and "| cocob | default |" in table
    assert "uv run python -m benchmarks.compare --suite digits --quick" in table
    for name in ("digits_curves.png", "digits_compute.png", "digits_step_sizes.png"):
        assert (out / name).stat().st_size > 5000
    result = json.loads((out / "digits.json").read_text())
    (workload,) = result["workloads"]
    cells = {c["label"]: c for c in workload["cells"]}
    sgd = cells["sgd_momentum"]
    assert [r["lr"] for r in sgd["grid_runs"]] == sgd["grid"] and len(sgd["grid"]) == 2
    assert all(r["split"] == "validation" and "test_accuracy" not in r for r in sgd["grid_runs"])
    assert sgd["chosen_lr"]["0"] == compare.select_lr(sgd["grid_runs"])
    (final,) = sgd["final_runs"]
    assert final["lr"] == sgd["chosen_lr"]["0"] and final["split"] == "test"
    assert [r["epoch"] for r in final["curve"]] == [1, 2]
    spe = workload["steps_per_epoch"]
    assert final["steps"] == 2 * spe
    summary = {s["label"]: s for s in workload["summary"]["cells"]}
    assert summary["sgd_momentum"]["total_steps"] == sum(
        r["steps"] for r in sgd["grid_runs"] + sgd["final_runs"]
    )
    assert summary["agd"]["total_steps"] == 2 * spe and summary["agd"]["grid_runs"] == 0
    assert 0.0 <= summary["agd"]["mean"] <= 1.0

    # The table and plots can be redrawn from the JSON alone, without training.
    redrawn = tmp_path / "redrawn"
    assert compare.main(["--from-json", str(out / "digits.json"), "--out", str(redrawn)]) == 0
    assert "| agd | none (gain 1) |" in (redrawn / "digits.md").read_text()
    assert (redrawn / "digits_compute.png").stat().st_size > 5000

    # A row trained later is added to the saved result, its command recorded with it.
    added = ["--suite", "digits", "--quick", "--optimizers", "hypergradient_sgd"]
    added += ["--add-to", str(out / "digits.json"), "--out", str(out)]
    assert compare.main(added + ["--runs-dir", str(tmp_path / "runs2")]) == 0
    table = (out / "digits.md").read_text()
    assert "| agd | none (gain 1) |" in table
    assert "| hypergradient_sgd | learned from 0.01, last epoch " in table
    assert "Rows hypergradient_sgd added later" in table
    result = json.loads((out / "digits.json").read_text())
    labels = [c["label"] for c in result["workloads"][0]["cells"]]
    assert labels == ["agd", "sgd_momentum", "cocob", "hypergradient_sgd"]
    result["meta"]["seeds"] = 2  # Rows of another protocol are refused before any training.
    (tmp_path / "other.json").write_text(json.dumps(result))
    added[added.index("--add-to") + 1] = str(tmp_path / "other.json")
    with pytest.raises(ValueError, match="seeds 2 differs"):
        compare.main(added + ["--runs-dir", str(tmp_path / "runs3")])


def test_sensitivity_study_writes_table_plot_and_json(tmp_path):
    from benchmarks.compare import sensitivity

    out = tmp_path / "results"
    argv = ["--epochs", "1", "--lrs", "0.01,0.1", "--heights", "0,1", "--hyper-lrs", "1e-3"]
    argv += ["--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    assert sensitivity.main(argv) == 0
    table = (out / "hypergradient_sensitivity_digits_fcn.md").read_text()
    assert "uv run python -m benchmarks.compare.sensitivity --epochs 1" in table
    assert "| 0 (plain SGD, fixed step) | " in table and "| 1 (hyper-step 0.001) | " in table
    result = json.loads((out / "hypergradient_sensitivity_digits_fcn.json").read_text())
    assert len(result["records"]) == 4
    fixed = [r for r in result["records"] if r["height"] == 0]
    assert all(r["learned_lr"] == r["lr"] for r in fixed)
    assert (out / "hypergradient_sensitivity_digits_fcn.png").stat().st_size > 5000
    with pytest.raises(SystemExit):
        sensitivity.parse_args(["--heights", "-1"])

    # Rows run in parallel are merged without training; both commands are kept.
    part = json.loads((out / "hypergradient_sensitivity_digits_fcn.json").read_text())
    for r in part["records"]:
        r["height"], r["hyper_lr"] = 2, 1e-4
    part["meta"]["command"] = "uv run python -m benchmarks.compare.sensitivity --other"
    (tmp_path / "part.json").write_text(json.dumps(part))
    saved = str(out / "hypergradient_sensitivity_digits_fcn.json")
    merged = tmp_path / "merged"
    assert (
        sensitivity.main(["--from-json", f"{saved},{tmp_path / 'part.json'}", "--out", str(merged)])
        == 0
    )
    table = (merged / "hypergradient_sensitivity_digits_fcn.md").read_text()
    assert "| 2 (hyper-step 0.0001) | " in table and "| 1 (hyper-step 0.001) | " in table
    assert (
        "--other` and `" not in table
        and "` and `uv run python -m benchmarks.compare.sensitivity --other`" in table
    )
    assert "merged by `uv run python -m benchmarks.compare.sensitivity --from-json" in table
    part["meta"]["seeds"] = 3
    (tmp_path / "part.json").write_text(json.dumps(part))
    with pytest.raises(ValueError, match="seeds differs"):
        sensitivity.main(["--from-json", f"{saved},{tmp_path / 'part.json'}", "--out", str(merged)])
