"""The additions for AGD's variants in the programs: the shapes dataset, the AlgoPerf one-config
entries, agd_momentum in the registry, and merging the comparison's results."""

import numpy as np
import pytest

from benchmarks import optimizers
from benchmarks.compare.saved import merge_results
from benchmarks.data.shapes import SHAPE_NAMES, generate_shapes


def test_shapes_are_cifar_shaped_deterministic_and_every_class_is_drawn():
    x, y = generate_shapes(200, seed=3)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.float32
    assert y.dtype == np.int32 and set(np.unique(y)) == set(range(len(SHAPE_NAMES)))
    assert 0.0 <= x.min() and x.max() <= 1.0
    x2, y2 = generate_shapes(200, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(generate_shapes(200, seed=4)[0], x)


def _hyper(total_steps):
    return optimizers.Hyper(lr=None, total_steps=total_steps)


def test_algoperf_nadamw_warms_up_over_two_percent_then_decays_to_zero():
    schedule = optimizers.algoperf_nadamw_schedule(1000)
    peak = optimizers.ALGOPERF_NADAMW_PEAK
    values = np.array([float(schedule(t)) for t in (0, 10, 20, 510, 1000)])
    np.testing.assert_allclose(values, [0.0, peak / 2, peak, peak / 2, 0.0], rtol=1e-5, atol=1e-9)


def test_new_entries_build_and_agd_momentum_starts_from_agd_init():
    for name in ("agd_momentum", "schedule_free_adamw_algoperf", "nadamw_algoperf"):
        spec = optimizers.get(name)
        assert not spec.takes_lr
        tx = spec.build(_hyper(100))
        params = {"dense": {"kernel": np.ones((4, 2), np.float32)}}
        updates, _ = tx.update(
            {"dense": {"kernel": np.full((4, 2), 0.5, np.float32)}}, tx.init(params), params
        )
        assert np.all(np.isfinite(updates["dense"]["kernel"]))
    assert optimizers.get("agd_momentum").agd_init
    assert optimizers.get("schedule_free_adamw_algoperf").eval_params is not None


def _result(suite, command, workloads):
    return {
        "suite": suite,
        "meta": {"command": command},
        "workloads": [
            {"name": name, "cells": [_cell(label, acc) for label, acc in cells]}
            for name, cells in workloads.items()
        ],
    }


def _cell(label, acc):
    run = {"test_accuracy": acc, "steps": 10, "wall_s": 1.0, "steps_per_epoch": 5,
           "curve": [{"epoch": 1, "test_accuracy": acc}, {"epoch": 2, "test_accuracy": acc}]}  # fmt: skip
    return {"label": label, "optimizer": label, "gain": 1.0, "tuned": False, "grid": [],
            "chosen_lr": {"0": None}, "grid_runs": [], "final_runs": [run]}  # fmt: skip


def test_merge_results_adds_rows_replaces_same_label_and_resummarises():
    a = _result("s", "first", {"w1": [("agd", 0.5), ("adam", 0.6)]})
    b = _result("s", "second", {"w1": [("agd_momentum", 0.7), ("adam", 0.65)], "w2": [("x", 1)]})
    merged = merge_results([a, b])
    assert merged["meta"]["command"] == "first ; second"
    w1 = merged["workloads"][0]
    assert [c["label"] for c in w1["cells"]] == ["agd", "adam", "agd_momentum"]
    assert w1["cells"][1]["final_runs"][0]["test_accuracy"] == 0.65
    assert [w["name"] for w in merged["workloads"]] == ["w1", "w2"]
    assert "summary" in w1
    assert a["workloads"][0]["cells"][1]["final_runs"][0]["test_accuracy"] == 0.6  # Not mutated.
    with pytest.raises(ValueError, match="different suites"):
        merge_results([a, _result("t", "third", {})])


def test_a_merge_keeps_every_files_added_rows_and_merges_on_record(tmp_path):
    a = _result("s", "first", {"w1": [("agd", 0.5)]})
    b = _result("s", "second", {"w2": [("adam", 0.6)]})
    a["meta"]["added"] = [{"command": "add-a", "rows": ["x"]}]
    b["meta"]["added"] = [{"command": "add-b", "rows": ["y"]}]
    b["meta"]["merged"] = ["merge-b"]
    merged = merge_results([a, b])
    assert [x["command"] for x in merged["meta"]["added"]] == ["add-a", "add-b"]
    assert merged["meta"]["merged"] == ["merge-b"]
    assert "added" not in merge_results([_result("s", "c", {}), _result("s", "d", {})])["meta"]


def test_merged_rows_follow_the_suites_order_whatever_order_they_ran_in():
    a = _result(
        "heldout2", "later rows", {"shapes_vgg_long": [("agd_momentum", 0.9), ("cocob", 0.8)]}
    )
    b = _result(
        "heldout2", "first rows", {"shapes_vgg_long": [("new_candidate", 0.5), ("adam", 0.7)]}
    )
    merged = merge_results([a, b])
    labels = [c["label"] for c in merged["workloads"][0]["cells"]]
    assert labels == ["adam", "cocob", "agd_momentum", "new_candidate"]
    assert [c["label"] for c in merged["workloads"][0]["summary"]["cells"]] == labels
