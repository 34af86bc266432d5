"""The training program's language model end to end, at tiny sizes."""

import json

import numpy as np
import pytest

from benchmarks import train
from benchmarks.config import Config
from benchmarks.run import train_and_evaluate

TINY = dict(
    arch="transformer",
    dataset="pystdlib",
    depth=2,
    width=16,
    heads=2,
    context=16,
    train_bs=8,
    test_bs=16,
    epochs=2,
    max_steps_per_epoch=4,
    eval_windows=16,
    samples=0,
    progress=False,
    checkpoint=False,
)


def test_cli_trains_a_language_model_on_the_default_corpus(tmp_path, capsys):
    workdir = tmp_path / "lm"
    argv = ["--arch", "transformer", "--depth", "1", "--width", "16", "--heads", "2"]
    argv += ["--context", "16", "--epochs", "2", "--max-steps-per-epoch", "5"]
    argv += ["--eval-windows", "16", "--samples", "1", "--workdir", str(workdir)]
    assert train.main(argv + ["--no-progress", "--no-checkpoint"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "agd transformer pystdlib: validation loss" in line and "tokens/s" in line
    loss = float(line.split("validation loss ")[1].split(" ")[0])
    assert 0 < loss < np.log(256)  # Better than uniform over the bytes after 10 steps.
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "pystdlib" and config["width"] == 16
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["corpus"]["python_version"] and len(summary["corpus"]["sha256"]) == 64
    assert summary["tokens_per_second"] > 0 and summary["loss_unit"] == "nats per byte"
    samples = (workdir / "samples.txt").read_text()
    assert "=== sample 1: generated ===" in samples


def test_cli_defaults_follow_the_arch():
    lm = train.parse_args(["--arch", "transformer"])
    assert (lm.dataset, lm.depth, lm.width, lm.max_steps_per_epoch) == ("pystdlib", 2, 128, 100)
    assert train.parse_args(["--arch", "transformer", "--width", "64"]).width == 64
    fcn = train.parse_args([])
    assert (fcn.dataset, fcn.depth, fcn.width, fcn.max_steps_per_epoch) == ("digits", 3, 256, None)


def test_stacked_and_unstacked_give_the_same_loss_curve(tmp_path):
    def curve(scan_layers):
        workdir = tmp_path / f"scan_layers_{scan_layers}"  # One folder per run.
        config = Config(**TINY, bias=True, tied=True, scan_layers=scan_layers, workdir=str(workdir))
        train_and_evaluate(config)
        rows = (workdir / "metrics.jsonl").read_text().splitlines()
        return [(r["train_loss"], r["test_loss"]) for r in map(json.loads, rows)]

    flat = curve(False)
    np.testing.assert_allclose(curve(True), flat, rtol=2e-5)
    assert flat[-1][1] < flat[0][1]


def test_a_local_text_file_with_a_compact_vocabulary(tmp_path):
    corpus = tmp_path / "input.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40)
    options = dict(dataset="text", data_dir=str(corpus), vocab="compact", optimizer="adamw")
    final = train_and_evaluate(Config(**(TINY | options), lr=3e-3, workdir=str(tmp_path / "run")))
    assert final["corpus"]["vocab_size"] == len(set(corpus.read_text()))
    assert "python_version" not in final["corpus"] and np.isfinite(final["test_loss"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset="digits"), "do not fit"),
        (dict(arch="fcn"), "do not fit"),
        (dict(heads=3), "must divide"),
        (dict(loss="mse"), "xent"),
        (dict(vocab="words"), "vocab"),
    ],
)
def test_bad_lm_configs_raise_clear_errors(overrides, message):
    values = TINY | overrides
    with pytest.raises(ValueError, match=message):
        Config(**values).validate()


def test_agd_with_its_one_d_leaves_handed_to_prodigy_trains(tmp_path):
    # optax.partition's state holds masked (empty) nodes the training loop must read past.
    config = Config(**(TINY | dict(epochs=1, max_steps_per_epoch=2)), bias=True)
    config.agd_rule, config.workdir = "1d_lr_free", str(tmp_path / "run")
    final = train_and_evaluate(config)
    assert np.isfinite(final["test_loss"]) and final["eta"] > 0
