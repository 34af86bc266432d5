"""The training program end to end on tiny data: every dataset, architecture and optimizer flag."""

import json

import jax
import numpy as np
import optax
import pytest
from fake_data import write_cifar, write_imagenet, write_mnist

from benchmarks import optimizers, train
from benchmarks.config import Config
from benchmarks.optimizers import OPTIMIZERS
from benchmarks.run import train_and_evaluate
from benchmarks.task import load_data


def _run(tmp_path, name="run", **overrides):
    values = dict(epochs=1, train_bs=32, test_bs=64, width=32, progress=False, checkpoint=False)
    values.update(overrides)
    return train_and_evaluate(Config(workdir=str(tmp_path / name), **values))


def test_cli_trains_digits_and_writes_everything(tmp_path, capsys):
    workdir = tmp_path / "digits"
    assert (
        train.main(["--epochs", "3", "--width", "64", "--workdir", str(workdir), "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    line = out.strip().splitlines()[-1]
    assert "test accuracy" in line and "images/s" in line
    accuracy = float(line.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.8
    config = json.loads((workdir / "config.json").read_text())
    assert config["optimizer"] == "agd" and config["dataset"] == "digits"
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["eta"] > 0 for r in rows)
    assert (workdir / "curves.png").stat().st_size > 1000
    assert (workdir / "checkpoints").is_dir()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps_per_epoch"] == 1437 // 128 and summary["epoch"] == 3


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    common = dict(epochs=4, checkpoint=True, width=32)
    full = _run(tmp_path, "full", **common)
    _run(tmp_path, "split", **(common | {"epochs": 2}))  # "killed" after epoch 2
    resumed = _run(tmp_path, "split", **(common | {"resume": True}))
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert resumed["test_accuracy"] == full["test_accuracy"]


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a = _run(tmp_path, "a", epochs=2)
    b = _run(tmp_path, "b", epochs=2)
    c = _run(tmp_path, "c", epochs=2, seed=1)
    assert a["train_loss"] == b["train_loss"]
    assert a["train_loss"] != c["train_loss"]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_trains(tmp_path, optimizer):
    final = _run(tmp_path, optimizer=optimizer, epochs=2, max_steps_per_epoch=8)
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["test_loss"])
    assert (
        final["test_accuracy"] > 0.1
    )  # Above chance on 10 classes (the slow starters: dog, mechanize).


def test_baseline_flags(tmp_path):
    final = _run(
        tmp_path,
        optimizer="sgd",
        lr=0.05,
        momentum=0.8,
        weight_decay=1e-4,
        schedule="warmup_cosine",
        warmup_epochs=0.5,
        epochs=2,
    )
    assert final["test_accuracy"] > 0.5


@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory):
    """A data folder shared by this file's MNIST-1D runs: generated once, then read back."""
    return str(tmp_path_factory.mktemp("mnist1d_data"))


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_mnist1d_cnn1d(tmp_path, loss, mnist1d_dir):
    final = _run(
        tmp_path,
        dataset="mnist1d",
        data_dir=mnist1d_dir,
        arch="cnn1d",
        depth=3,
        width=16,
        loss=loss,
        max_steps_per_epoch=10,
    )
    assert np.isfinite(final["test_loss"])


# Each on-disk format with an architecture: (writer of the files, the run's options).
ON_DISK = {
    "mnist_idx_gz_fcn_bias": (
        lambda d: write_mnist(d, gz=True),
        dict(dataset="mnist", arch="fcn", depth=2, bias=True),
    ),
    "cifar10_tarball_vgg": (
        lambda d: write_cifar(d, "cifar10", tarball=True),
        dict(dataset="cifar10", arch="vgg", width=8, depth=None),
    ),
    "cifar10_folder_preact_resnet18": (
        lambda d: write_cifar(d, "cifar10", tarball=False),
        dict(
            dataset="cifar10",
            arch="preact_resnet18",
            width=4,
            depth=None,
            max_steps_per_epoch=2,
            loss="mse",
        ),
    ),
    "cifar100_folder_resnet18_affine_bn_bf16": (
        lambda d: write_cifar(d, "cifar100", tarball=False),
        dict(
            dataset="cifar100",
            arch="resnet18",
            width=4,
            depth=None,
            compute_dtype="bfloat16",
            bias=True,
            loss="mse",
        ),
    ),
    "cifar100_folder_fcn_bias_bf16": (
        lambda d: write_cifar(d, "cifar100", tarball=False),
        dict(dataset="cifar100", arch="fcn", depth=2, compute_dtype="bfloat16", bias=True),
    ),
    "imagenet_folders_fcn": (
        lambda d: write_imagenet(d, per_class=8),
        dict(
            dataset="imagenet",
            arch="fcn",
            depth=2,
            image_size=16,
            num_workers=0,
            train_bs=8,
            test_bs=8,
        ),
    ),
    "imagenet_folders_resnet50": (
        lambda d: write_imagenet(d, per_class=8),
        dict(
            dataset="imagenet",
            arch="resnet50",
            width=4,
            depth=None,
            image_size=32,
            num_workers=0,
            train_bs=8,
            test_bs=8,
        ),
    ),
}


# The residual networks compile for about a minute each on a 2-core CPU: their formats are
# covered above with a small network, their forward passes in test_models.py.
SLOW_ON_DISK = (
    "cifar10_folder_preact_resnet18",
    "cifar100_folder_resnet18_affine_bn_bf16",
    "imagenet_folders_resnet50",
)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_ON_DISK else c for c in sorted(ON_DISK)],
)
def test_real_formats_and_architectures_train(tmp_path, case):
    write, options = ON_DISK[case]
    write(tmp_path / "data")
    final = _run(tmp_path, data_dir=str(tmp_path / "data"), **options)
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["test_loss"])


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="larger than the 1437 training examples"):
        _run(tmp_path, train_bs=2048)
    with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
        _run(tmp_path, train_bs=30)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        _run(tmp_path, dataset="mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        _run(tmp_path, optimizer="lion")
    with pytest.raises(SystemExit):
        train.parse_args(["--resume"])  # --resume needs --workdir
    write_imagenet(tmp_path / "inet", per_class=2)
    with pytest.raises(ValueError, match="validation_split is for in-memory datasets"):
        _run(tmp_path, dataset="imagenet", data_dir=str(tmp_path / "inet"), validation_split=0.2)


def test_a_registered_optimizer_gets_its_flag_and_its_logged_scalar(tmp_path, monkeypatch):
    """Adding an optimizer is one registry entry: its option becomes a flag of the training
    program, its value reaches the factory, and the state field it names is logged per epoch."""
    entry = optimizers.Optimizer(
        lambda h: optax.inject_hyperparams(optax.sgd)(learning_rate=h.options["base_lr"]),
        "SGD whose learning rate lives in its state",
        default_lr=0.1,
        logged=("learning_rate",),
        options=(optimizers.Option("base_lr", float, 0.01, "the learning rate"),),
    )
    monkeypatch.setitem(optimizers.OPTIMIZERS, "sgd_in_state", entry)
    argv = ["--optimizer", "sgd_in_state", "--base-lr", "0.05", "--epochs", "1", "--width", "16"]
    config = train.parse_args([*argv, "--workdir", str(tmp_path / "r"), "--no-progress"])
    assert config.optimizer_options == {"base_lr": 0.05}
    config.max_steps_per_epoch, config.checkpoint = 3, False
    final = train_and_evaluate(config)
    assert final["learning_rate"] == pytest.approx(0.05)
    assert Config(optimizer="sgd_in_state").validate().optimizer_options == {"base_lr": 0.01}
    with pytest.raises(ValueError, match="optimizer 'adam' has no option"):
        Config(optimizer="adam", optimizer_options={"base_lr": 0.1}).validate()


def test_data_seed_draws_the_digits_split_and_is_refused_for_fixed_splits():
    standard = load_data(Config())
    np.testing.assert_array_equal(load_data(Config(seed=5)).train_y, standard.train_y)
    assert not np.array_equal(load_data(Config(data_seed=1)).train_y, standard.train_y)
    with pytest.raises(ValueError, match="'cifar10' has a fixed train/test split"):
        Config(dataset="cifar10", data_seed=1).validate()


def test_hypergradient_optimizers_log_their_learned_step_size(tmp_path):
    options = {"hyper_height": 2, "hyper_lr": 1e-3}
    _run(
        tmp_path,
        optimizer="hypergradient-sgd",
        optimizer_options=options,
        epochs=2,
        max_steps_per_epoch=8,
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["learning_rate"] > 0 for r in rows)
    assert rows[-1]["learning_rate"] != 0.01  # Learned from the default initial step.
    # Height 0: SGD at the fixed step, logged the same way.
    fixed = _run(tmp_path, "fixed", optimizer="hypergradient-sgd", lr=0.05,
                 optimizer_options={"hyper_height": 0}, max_steps_per_epoch=3)  # fmt: skip
    assert fixed["learning_rate"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="--schedule constant"):
        _run(tmp_path, "cosine", optimizer="hypergradient-sgd", schedule="cosine")
    with pytest.raises(ValueError, match="height must be a Python int >= 0"):
        _run(tmp_path, "bad", optimizer="hypergradient-sgd", optimizer_options={"hyper_height": -1})
    config = train.parse_args(["--optimizer", "hypergradient-adam", "--hyper-height", "3"])
    assert config.optimizer_options == {"hyper_height": 3, "hyper_lr": 1e-5}


# --------------------------------------------------------------------------------------------------
# What ran is what was asked for.

WHAT_RAN = [
    # (flags, state types that must appear, that must not, leaves whose roles are recorded)
    ({}, ["AGDState"], ["PartitionState"], {"layers/0/kernel": "dense in (-2,) out (-1,)"}),
    (
        dict(bias=True),  # The program's default rule: 1-D leaves to Prodigy.
        ["PartitionState", "AGDState", "ProdigyState"],
        [],
        {"layers/0/bias": "bias"},
    ),
    (
        dict(bias=True, agd_rule="library"),
        ["AGDState"],
        ["PartitionState", "ProdigyState"],
        {},
    ),
    (
        dict(bias=True, agd_rule="1d_frozen"),
        ["PartitionState", "AGDState"],
        ["ProdigyState"],
        {},
    ),
    (dict(optimizer="adam"), ["ScaleByAdamState"], ["AGDState"], None),
    (
        dict(optimizer="agd_momentum"),
        ["AGDMomentumState"],
        ["PartitionState"],
        {"layers/2/kernel": "dense in (-2,) out (-1,)"},
    ),
]


@pytest.mark.parametrize("flags, has, lacks, roles", WHAT_RAN)
def test_the_run_uses_the_optimizer_rule_and_roles_it_was_asked_for(
    tmp_path, flags, has, lacks, roles
):
    final = _run(tmp_path, width=16, max_steps_per_epoch=2, **flags)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ran"] == final["ran"]
    types = final["ran"]["optimizer_state"]
    assert all(t in types for t in has) and not any(t in types for t in lacks), types
    if roles is None:  # Optimizers that take no roles never read them.
        assert final["ran"]["roles"] is None
    else:
        assert set(final["ran"]["roles"]) >= set(roles)
        assert {k: final["ran"]["roles"][k] for k in roles} == roles


def test_a_language_model_reads_its_roles_off_the_forward_pass(tmp_path):
    final = _run(
        tmp_path, arch="transformer", dataset="pystdlib", depth=1, width=16, heads=2, context=8,
        train_bs=8, test_bs=8, max_steps_per_epoch=2, eval_windows=8, samples=0, tied=True,
    )  # fmt: skip
    roles = final["ran"]["roles"]
    # Tied: one weight, the map width -> vocabulary that the lookup and the head share.
    assert roles["token_embed/embedding"] == "embedding in (-1,) out (-2,)"
    assert roles["blocks/0/attn/query/kernel"] == "dense in (0,) out (1, 2)"  # (width, heads, dim)


def test_checkpoints_by_interval_keep_the_last_epoch_and_resume_exactly(tmp_path):
    """Every second epoch saved (and the last); a run stopped after epoch 3 resumes from 2."""
    common = dict(epochs=4, checkpoint=True, width=16, checkpoint_every=2)
    full = _run(tmp_path, "full", **common)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["2", "4"]
    _run(tmp_path, "split", **(common | {"epochs": 3}))  # Its last epoch, 3, is saved too.
    resumed = _run(tmp_path, "split", **(common | {"resume": True}))
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["test_accuracy"] == full["test_accuracy"]


def test_the_automatic_checkpoint_policy_saves_the_last_epoch(tmp_path):
    final = _run(tmp_path, epochs=3, checkpoint=True, width=16, max_steps_per_epoch=2)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved[-1] == "3" and final["checkpoint_time_s"] > 0
    for key in ("compile_time_s", "init_time_s", "train_time_s", "images_per_second"):
        assert final[key] > 0, key


def test_generated_datasets_are_cached_with_a_checksum_and_rebuilt_when_damaged(
    tmp_path, monkeypatch
):
    from benchmarks.data.small import load_digits

    monkeypatch.setenv("AGD_OPTAX_CACHE", str(tmp_path / "cache"))
    first = load_digits(seed=3)
    path = tmp_path / "cache" / "digits" / "digits_seed3.npz"
    assert path.exists() and (path.parent / "digits_seed3.npz.sha256").exists()
    path.write_bytes(
        path.read_bytes()[:100]
    )  # Damaged: the checksum fails, the split is made again.
    again = load_digits(seed=3)
    np.testing.assert_array_equal(again.train_x, first.train_x)
    assert (path.parent / "digits_seed3.npz.sha256").read_text().strip() != ""
    np.testing.assert_array_equal(load_digits(seed=3).test_y, first.test_y)  # From the cache.
