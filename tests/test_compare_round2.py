"""The evidence suite's round-two machinery: grids extended past an edge choice, runs resumed from
their records, more seeds for the rows that decide the bar, the epoch rule and the sizing run,
cells trained in several processes, and Muon in the registry."""

import json
import math
import os

import jax
import numpy as np
import pytest

from benchmarks import compare
from benchmarks.compare import Entry, Workload
from benchmarks.compare.protocol import (
    last_fifth_rise,
    open_edge,
    point_beyond,
    rows_deciding_the_bar,
    tune,
)


def _record(lr, val, metric="accuracy"):
    other = "loss" if metric == "accuracy" else "accuracy"
    return {"lr": lr, "split": "validation", f"val_{metric}": val, f"val_{other}": 1.0}


def test_point_beyond_walks_the_half_decade_lattice_and_keeps_other_ratios():
    assert point_beyond([1e-3, 3e-3, 1e-2], "up") == 3e-2
    assert point_beyond([1e-3, 3e-3, 1e-2], "down") == 3e-4
    assert point_beyond([3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "up") == 1.0
    assert point_beyond([3e-3, 1e-2], "down") == 1e-3
    assert point_beyond([0.002, 0.004], "up") == 0.008  # Off the lattice: the edge's ratio.
    with pytest.raises(ValueError, match="two points"):
        point_beyond([1e-3], "up")
    with pytest.raises(ValueError, match="side"):
        point_beyond([1e-3, 1e-2], "left")


def test_open_edge_on_fake_records():
    interior = [_record(1e-3, 0.5), _record(1e-2, 0.9), _record(1e-1, 0.7)]
    assert open_edge(interior) is None
    assert open_edge([_record(1e-3, 0.5), _record(1e-2, 0.9)]) == "up"
    assert open_edge([_record(1e-3, 0.9), _record(1e-2, 0.5)]) == "down"
    # A diverged point closes its edge: the best finite point below it is interior.
    diverged_top = [_record(1e-3, 0.5), _record(1e-2, 0.9), _record(1e-1, math.nan)]
    assert open_edge(diverged_top) is None
    # Every point diverged: smaller steps next.
    assert open_edge([_record(1e-2, math.nan), _record(1e-1, math.nan)]) == "down"
    loss = [_record(1e-3, 2.0, "loss"), _record(1e-2, 1.5, "loss")]
    assert open_edge(loss, "loss") == "up"


class _PeakRunner:
    """Validation accuracy peaks at ``best``; a run above ``diverge`` is NaN."""

    def __init__(self, best, diverge=math.inf):
        self.best, self.diverge, self.lrs = best, diverge, []

    def run(self, workload, entry, lr, seed, validation):
        self.lrs.append(lr)
        acc = math.nan if lr > self.diverge else 0.9 - abs(math.log10(lr / self.best)) / 10
        prefix = "val" if validation else "test"
        return {"lr": lr, "seed": seed, "split": "validation" if validation else "test",
                f"{prefix}_accuracy": acc, f"{prefix}_loss": 1.0, "steps": 10, "wall_s": 1.0,
                "steps_per_epoch": 5, "curve": [{"epoch": 1, f"{prefix}_accuracy": acc}]}  # fmt: skip


def test_tune_extends_the_grid_until_the_choice_is_interior():
    workload = Workload("w", "w", dict(dataset="digits"), extend_grid=4)
    entry = Entry("sgd_momentum", "sgd", grid=(1e-3, 3e-3, 1e-2))
    runner = _PeakRunner(best=3e-2)
    runs, chosen, added = tune(runner, workload, entry, 0, max_extensions=4)
    assert added == [3e-2, 1e-1] and chosen == 3e-2  # 1e-1 is worse: 3e-2 is interior.
    assert runner.lrs == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    # Downwards too, and the cap stops an optimum far away (the grid stays open).
    runs, chosen, added = tune(_PeakRunner(best=1e-6), workload, entry, 0, max_extensions=2)
    assert added == [3e-4, 1e-4] and chosen == 1e-4 and open_edge(runs) == "down"
    # A diverged point past the edge closes it.
    runs, chosen, added = tune(_PeakRunner(best=1.0, diverge=2e-2), workload, entry, 0, 4)
    assert added == [3e-2] and chosen == 1e-2 and open_edge(runs) is None
    # The cell records its final grid and whether it closed.
    cell = compare.run_cell(_PeakRunner(best=3e-2), workload, entry, [0, 1])
    assert cell["grid"] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and cell["grid_added"] == [3e-2, 1e-1]
    assert cell["grid_declared"] == [1e-3, 3e-3, 1e-2] and cell["grid_closed"]
    assert cell["chosen_lr"] == {"0": 3e-2, "1": 3e-2}
    assert not compare.summarize([cell])["cells"][0]["grid_edge"]


def _summary(rows):
    return {"cells": [{"label": k, "mean": m, "std": s, "n": 3} for k, (m, s) in rows.items()]}


def test_rows_deciding_the_bar_are_those_whose_spreads_overlap():
    rows = {"sgd": (0.80, 0.01), "adam": (0.85, 0.01), "prodigy": (0.70, 0.02),
            "dog": (0.60, 0.01), "cand": (0.84, 0.01)}  # fmt: skip
    cells = [{"label": k, "tuned": k in ("sgd", "adam")} for k in rows]
    peers = ("prodigy", "dog")
    # cand overlaps the best tuned row (adam), not the best peer (prodigy).
    assert rows_deciding_the_bar(_summary(rows), cells, "cand", peers) == ["adam", "cand"]
    rows["prodigy"] = (0.82, 0.02)
    assert rows_deciding_the_bar(_summary(rows), cells, "cand", peers) == [
        "adam",
        "cand",
        "prodigy",
    ]
    rows["cand"] = (0.95, 0.01)
    assert rows_deciding_the_bar(_summary(rows), cells, "cand", peers) == []
    # On a loss, the best rows are the lowest.
    loss = {
        "adamw": (1.50, 0.01),
        "sgd": (2.0, 0.1),
        "prodigy": (1.60, 0.01),
        "cand": (1.55, 0.045),
    }
    cells = [{"label": k, "tuned": k in ("adamw", "sgd")} for k in loss]
    assert rows_deciding_the_bar(_summary(loss), cells, "cand", peers, "loss") == [
        "adamw", "cand", "prodigy"]  # fmt: skip
    with pytest.raises(ValueError, match="candidate"):
        rows_deciding_the_bar(_summary(rows), cells, "nope", peers)


def test_last_fifth_rise():
    curve = [{"epoch": e, "val_accuracy": 0.1 * e} for e in range(1, 11)]
    assert last_fifth_rise(curve) == pytest.approx(0.2)  # Epoch 8 to 10.
    assert last_fifth_rise(curve[:3]) == pytest.approx(0.1)  # At least one epoch back.
    with pytest.raises(ValueError):
        last_fifth_rise(curve[:1])


# A stand-in for the training program: validation accuracy peaks at lr 0.03, rises by 0.01 an
# epoch; every call is counted. It writes the per-epoch metrics as a run does.
CALLS = []


def _fake_train(config, workdir):
    from benchmarks.run_folder import write_metrics

    CALLS.append((config.optimizer, config.lr, config.seed, config.validation_split))
    if config.max_steps_per_epoch == 2:  # The warm-up's runs: not a counted run of the suite.
        CALLS.pop()
    peak = 0.9 - abs(math.log10((config.lr or 0.03) / 0.03)) / 10 + 0.001 * config.seed
    rows = [{"epoch": e, "test_accuracy": peak - 0.01 * (config.epochs - e), "test_loss": 1.0,
             "train_loss": 1.0} for e in range(1, config.epochs + 1)]  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    write_metrics(workdir, rows)
    return {"test_accuracy": rows[-1]["test_accuracy"], "test_loss": 1.0, "train_loss": 1.0,
            "steps_per_epoch": 3}  # fmt: skip


@pytest.fixture
def fake_training(monkeypatch):
    from benchmarks import run as training

    monkeypatch.setattr(training, "train_and_evaluate", _fake_train)
    CALLS.clear()
    return CALLS


def _argv(tmp_path, *more):
    return ["--suite", "digits", "--epochs", "5", "--seeds", "2", "--grid", "0.001,0.003",
            "--max-extensions", "4", "--optimizers", "agd,sgd_momentum,cocob",
            "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), *more]  # fmt: skip


def test_suite_extends_grids_resumes_and_adds_seeds(tmp_path, fake_training):
    calls = fake_training
    real_fake = _fake_train

    def interrupted(config, workdir):  # Stops after 4 counted runs, as a killed suite would.
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_fake(config, workdir)

    from benchmarks import run as training

    training.train_and_evaluate = interrupted
    with pytest.raises(KeyboardInterrupt):
        compare.main(_argv(tmp_path))
    training.train_and_evaluate = _fake_train
    assert compare.main(_argv(tmp_path)) == 0
    # sgd: 2 declared + 3 added grid points, 2 seeds; agd and cocob: 2 seeds each. 4 ran before.
    assert len(calls) == 4 + (5 + 2 + 2 + 2 - 4)
    result = json.loads((tmp_path / "out" / "digits.json").read_text())
    assert result["meta"]["runs_reused"] == 4
    cells = {c["label"]: c for c in result["workloads"][0]["cells"]}
    sgd = cells["sgd_momentum"]
    assert sgd["grid"] == [0.001, 0.003, 0.01, 0.03, 0.1] and sgd["grid_closed"]
    assert sgd["chosen_lr"] == {"0": 0.03, "1": 0.03}
    table = (tmp_path / "out" / "digits.md").read_text()
    assert "- sgd_momentum: 0.001, 0.003, 0.01, 0.03, 0.1 (0.01, 0.03, 0.1 added past the " in table
    assert "chosen 0.03, interior" in table

    # The same command again trains nothing.
    calls.clear()
    assert compare.main(_argv(tmp_path)) == 0 and calls == []
    # More seeds for two rows: only their new seeds train.
    more = ["--extra-seeds-for", "sgd_momentum,cocob", "--extra-seeds", "4"]
    assert compare.main(_argv(tmp_path, *more)) == 0
    assert sorted((o, s) for o, lr, s, split in calls) == [
        ("cocob", 2), ("cocob", 3), ("sgd", 2), ("sgd", 3)]  # fmt: skip
    result = json.loads((tmp_path / "out" / "digits.json").read_text())
    summary = {s["label"]: s for s in result["workloads"][0]["summary"]["cells"]}
    assert (summary["sgd_momentum"]["n"], summary["cocob"]["n"], summary["agd"]["n"]) == (4, 4, 2)
    assert result["meta"]["extra_seeds"]["rows"] == {"digits_fcn": ["sgd_momentum", "cocob"]}
    table = (tmp_path / "out" / "digits.md").read_text()
    assert "(4 seeds)" in table and "Rows given 4 seeds" in table
    # The rows deciding the bar, chosen from the 2-seed results.
    calls.clear()
    bar = ["--extra-seeds-for", "bar:agd", "--extra-seeds", "3"]
    assert compare.main(_argv(tmp_path, *bar)) == 0
    result = json.loads((tmp_path / "out" / "digits.json").read_text())
    rows = result["meta"]["extra_seeds"]["rows"]["digits_fcn"]
    assert rows == ["agd", "cocob", "sgd_momentum"]  # The same accuracy: every spread overlaps.
    # --fresh trains everything again.
    calls.clear()
    assert compare.main(_argv(tmp_path, "--fresh")) == 0
    assert len(calls) == 5 + 2 + 2 + 2
    with pytest.raises(ValueError, match="no row"):
        compare.main(_argv(tmp_path, "--extra-seeds-for", "adam", "--extra-seeds", "3"))


def test_a_record_of_other_settings_is_not_reused(tmp_path, fake_training):
    from benchmarks.compare.runner import Runner

    workload = compare.SUITES["digits"][0]
    sgd = next(e for e in compare.ENTRIES if e.label == "sgd_momentum")
    first = Runner(str(tmp_path), {"epochs": 2}).run(workload, sgd, 0.01, 0, validation=True)
    again = Runner(str(tmp_path), {"epochs": 2}).run(workload, sgd, 0.01, 0, validation=True)
    assert again == json.loads(json.dumps(first)) and len(fake_training) == 1
    Runner(str(tmp_path), {"epochs": 3}).run(workload, sgd, 0.01, 0, validation=True)
    assert len(fake_training) == 2  # Same workdir, other epochs: trained again.


def test_a_record_keeps_numpy_numbers_and_nan_and_wants_its_settings(tmp_path):
    from benchmarks.compare.runner import load_record, save_record

    record = {"val_accuracy": np.float32(0.5), "steps": np.int64(7), "val_loss": math.nan}
    save_record(str(tmp_path / "run"), "key", record)
    back = load_record(str(tmp_path / "run"), "key")
    assert back["val_accuracy"] == 0.5 and back["steps"] == 7 and math.isnan(back["val_loss"])
    assert load_record(str(tmp_path / "run"), "other key") is None
    assert load_record(str(tmp_path / "nothing"), "key") is None


def test_epoch_rule_and_time_one_print_no_result(tmp_path, fake_training, capsys):
    argv = _argv(tmp_path, "--epoch-rule")
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    # Only the tuned row's grid runs, on the validation split.
    assert {(o, split) for o, lr, s, split in fake_training} == {("sgd", 0.2)}
    assert "best tuned row sgd_momentum (lr 0.03, grid closed)" in out
    assert "rose by 1.00 points over the last fifth of its epochs (epoch 4 to 5)" in out
    assert "double the epochs to 10" in out
    saved = json.loads((tmp_path / "out" / "digits_fcn_epoch_rule.json").read_text())
    assert saved["best"] == "sgd_momentum" and not saved["enough"]
    assert saved["rise_points"] == pytest.approx(1.0)
    assert "accuracy" not in json.dumps(saved)  # The accuracy itself is not kept.

    fake_training.clear()
    argv = _argv(tmp_path, "--time-one", "sgd_momentum", "--workloads", "digits_fcn")
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    assert fake_training == [("sgd", 0.003, 0, 0.0)]
    assert "one run took" in out and "2 grid runs (before any extension) and 6 final runs" in out
    assert "accuracy" not in out and "loss" not in out


def test_a_worker_trains_the_cells_it_claims(tmp_path, fake_training, monkeypatch):
    from benchmarks.compare import pool
    from benchmarks.compare.runner import Runner

    launched = []

    def popen(argv, env):  # The workers, one after the other in this process.
        launched.append(env["XLA_FLAGS"])
        code = pool.worker(argv[-2], int(argv[-1]))
        return type("Done", (), {"wait": lambda self: code, "poll": lambda self: code})()

    monkeypatch.setattr(pool.subprocess, "Popen", popen)
    workload = compare.SUITES["digits"][0]
    entries = {e.label: e for e in compare.ENTRIES}
    runner = Runner(str(tmp_path), {"epochs": 2})
    tasks = [(workload.name, entries["agd"], [0, 1], None),
             (workload.name, entries["sgd_momentum"], None, 0)]  # fmt: skip
    pool.run_in_workers("digits", runner, tasks, jobs=2)
    assert len(launched) == 2 and all(pool.ONE_THREAD in flags for flags in launched)
    # Each cell once: agd's two seeds, sgd's grid alone (5 points, on the validation split).
    assert sorted(fake_training, key=str) == sorted(
        [("agd", None, 0, 0.0), ("agd", None, 1, 0.0)]
        + [("sgd", lr, 0, 0.2) for lr in entries["sgd_momentum"].grid], key=str)  # fmt: skip
    fake_training.clear()
    runner.run(workload, entries["agd"], None, 1, validation=False)  # Read back, not trained.
    assert fake_training == []


@pytest.mark.slow  # The worker path is covered in process above; this adds the real processes.
def test_jobs_trains_cells_in_worker_processes_then_reads_them_back(tmp_path):
    argv = ["--suite", "digits", "--epochs", "1", "--seeds", "1", "--optimizers", "agd,cocob",
            "--jobs", "2", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    assert compare.main(argv) == 0
    result = json.loads((tmp_path / "out" / "digits.json").read_text())
    assert result["meta"]["runs_reused"] == 2  # Both trained by the workers.
    assert [c["label"] for c in result["workloads"][0]["cells"]] == ["agd", "cocob"]
    assert all(
        0.0 < c["final_runs"][0]["test_accuracy"] <= 1.0 for c in result["workloads"][0]["cells"]
    )


def test_heldout2_is_declared_as_the_protocol_says():
    suite = {w.name: w for w in compare.SUITES["heldout2"]}
    lm = suite["lm_long"].config
    assert (lm["arch"], lm["depth"], lm["width"], lm["context"], lm["train_bs"]) == (
        "transformer", 2, 64, 64, 32)  # fmt: skip
    assert lm["epochs"] * lm["max_steps_per_epoch"] == 1200 and suite["lm_long"].metric == "loss"
    assert (
        suite["shapes_resnet18_bn"].config["bias"]
        and suite["shapes_vgg_long"].config["epochs"] >= 10
    )
    cnn = suite["mnist1d_cnn_d6w48"].config
    assert (cnn["arch"], cnn["depth"], cnn["width"], cnn["epochs"]) == ("cnn1d", 6, 48, 60)
    for w in suite.values():
        assert w.extend_grid >= 1
        labels = {e.label for e in w.entries}
        assert {"agd", "agd_momentum", "sgd_momentum", "adam", "nadamw", "prodigy", "dog",
                "dadapt_adamw", "cocob", "mechanize", "schedule_free_adamw",
                "schedule_free_adamw_algoperf", "nadamw_algoperf"} <= labels  # fmt: skip
        for e in w.entries:
            if e.tuned:  # At least 5 points, a factor of about 3 apart.
                ratios = np.diff(np.log10(e.grid))
                assert len(e.grid) >= 5 and np.allclose(ratios, 0.5, atol=0.03)
    assert {"adamw_warmup_cosine", "muon_warmup_cosine"} <= {
        e.label for e in suite["lm_long"].entries
    }
    from benchmarks.compare.runner import Runner

    runner = Runner("unused", {})
    for w in suite.values():  # Every row's configuration is valid (nothing is trained).
        for e in w.entries:
            runner.config(w, e, e.grid[0] if e.grid else None, 0, 0.2)

    from benchmarks.compare.workloads import candidate_entries

    (row,) = candidate_entries(["agd_momentum"])
    assert row.label == "agd_momentum" and not row.tuned
    with pytest.raises(ValueError, match="register it"):
        candidate_entries(["not_an_optimizer"])


def test_heldout2_cnn1d_of_depth_6_fits_mnist1d_signals():
    from flax import nnx

    from benchmarks.models import make_model

    config = next(w for w in compare.SUITES["heldout2"] if w.name == "mnist1d_cnn_d6w48").config
    model = make_model("cnn1d", num_classes=10, input_shape=(40,), depth=config["depth"],
                       width=config["width"], rngs=nnx.Rngs(0))  # fmt: skip
    assert model(np.zeros((2, 40), np.float32)).shape == (2, 10)  # 5 stride-2 convs of 40.


def test_muon_orthogonalises_hidden_matrices_and_hands_the_rest_to_adam():
    from optax.contrib import MuonDimensionNumbers

    import agd_optax
    from benchmarks.optimizers import OPTIMIZERS, Hyper, muon_dimension_numbers

    rng = np.random.default_rng(0)
    shapes = {"query": (16, 2, 4), "fc": (16, 32), "head": (16, 10), "embed": (10, 16),
              "conv": (3, 3, 4, 8), "bias": (8,)}  # fmt: skip
    roles = {"blocks": {"query": {"kernel": agd_optax.dense(in_axes=0, out_axes=(1, 2))},
                        "fc": {"kernel": agd_optax.dense()}, "conv": {"kernel": agd_optax.conv()},
                        "fc_b": {"bias": agd_optax.bias()}},
             "head": {"kernel": agd_optax.dense()}, "tok": {"embedding": agd_optax.embedding()}}  # fmt: skip
    params = {"blocks": {"query": {"kernel": shapes["query"]}, "fc": {"kernel": shapes["fc"]},
                         "conv": {"kernel": shapes["conv"]}, "fc_b": {"bias": shapes["bias"]}},
              "head": {"kernel": shapes["head"]}, "tok": {"embedding": shapes["embed"]}}  # fmt: skip
    params = {k: {m: {n: np.asarray(rng.normal(size=s), np.float32) for n, s in leaf.items()}
                  for m, leaf in v.items()} if k == "blocks" else
              {n: np.asarray(rng.normal(size=s), np.float32) for n, s in v.items()}
              for k, v in params.items()}  # fmt: skip
    dims = muon_dimension_numbers(roles, params)
    assert dims["blocks"]["query"]["kernel"] == MuonDimensionNumbers((0,), (1, 2))
    assert dims["blocks"]["fc"]["kernel"] == MuonDimensionNumbers((-2,), (-1,))
    # A convolution's kernel positions join its fan-in.
    assert dims["blocks"]["conv"]["kernel"] == MuonDimensionNumbers((0, 1, -2), (-1,))
    assert dims["head"]["kernel"] is None and dims["tok"]["embedding"] is None
    assert dims["blocks"]["fc_b"]["bias"] is None

    lr = 0.01
    tx = OPTIMIZERS["muon"].build(Hyper(lr=lr, roles=lambda: roles))
    grads = {k: {m: {n: np.asarray(rng.normal(size=x.shape), np.float32) for n, x in leaf.items()}
                 for m, leaf in v.items()} if k == "blocks" else
             {n: np.asarray(rng.normal(size=x.shape), np.float32) for n, x in v.items()}
             for k, v in params.items()}  # fmt: skip
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step (Nesterov's, as optax's Muon runs it) is -c lr sign(g) on the leaves Muon
    # leaves alone: c = 1 + b1 (1 - b1) / (1 - b1^2) = 1.4737.
    for leaf, grad in ((updates["head"]["kernel"], grads["head"]["kernel"]),
                       (updates["tok"]["embedding"], grads["tok"]["embedding"])):  # fmt: skip
        np.testing.assert_allclose(leaf, -lr * (1 + 0.09 / 0.19) * np.sign(grad), rtol=1e-3)
    # Muon's step on a hidden matrix is (nearly) orthogonal: its singular values are close.
    sv = np.linalg.svd(np.asarray(updates["blocks"]["fc"]["kernel"]), compute_uv=False)
    assert sv.max() / sv.min() < 2.0
    sv = np.linalg.svd(np.asarray(updates["blocks"]["query"]["kernel"]).reshape(16, 8),
                       compute_uv=False)  # fmt: skip
    assert sv.max() / sv.min() < 2.0
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
