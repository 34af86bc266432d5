"""Tests of the benchmark data loaders (benchmarks.data) on tiny files in the real formats."""

import gzip
import hashlib
import io
import pickle
import random
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import benchmarks.data.download as download_mod
import benchmarks.data.small as small_mod
from benchmarks.data import (
    CIFAR_SPECS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    Dataset,
    ImageNetData,
    augment_cifar,
    download_file,
    load_dataset,
    parse_idx,
)

# --------------------------------------------------------------------------------------------
# Writers of the real on-disk formats.


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    array = np.asarray(array)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(np.asarray(array, np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist(directory: Path, gz: bool, n_train: int = 6, n_test: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz)
    return arrays


def cifar_batch(rng, n: int, label_key: str, num_classes: int) -> tuple[dict, np.ndarray]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    batch = {b"batch_label": b"x", b"data": data, label_key.encode(): [int(v) for v in labels]}
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return batch, data


def write_cifar(root: Path, name: str, tarball: bool, n: int = 3, seed: int = 0):
    """Write CIFAR-10/100 python-version pickles; return the raw (data, labels) per split."""
    spec = CIFAR_SPECS[name]
    rng = np.random.default_rng(seed)
    payloads, raw = {}, {"train": [], "test": []}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        for fname in files:
            batch, data = cifar_batch(rng, n, spec.label_key, spec.num_classes)
            payloads[fname] = pickle.dumps(batch, protocol=2)
            raw[split].append((data, np.asarray(batch[spec.label_key.encode()])))
    root.mkdir(parents=True, exist_ok=True)
    if tarball:
        with tarfile.open(root / spec.archive, "w:gz") as tar:
            for fname, payload in payloads.items():
                info = tarfile.TarInfo(f"{spec.folder}/{fname}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        for fname, payload in payloads.items():
            (root / spec.folder).mkdir(exist_ok=True)
            (root / spec.folder / fname).write_bytes(payload)
    return {
        split: (np.concatenate([d for d, _ in v]), np.concatenate([y for _, y in v]))
        for split, v in raw.items()
    }


def write_jpeg(path: Path, size: tuple[int, int], seed: int = 0, color=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        pixels = np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()
    Image.fromarray(pixels).save(path, quality=95)


def write_imagenet(root: Path) -> None:
    """2 classes; 5 train and 3 val images of varied sizes (one val image a solid colour)."""
    train = {"n01": [(50, 40), (40, 64), (33, 33)], "n02": [(48, 48), (60, 45)]}
    for wnid, sizes in train.items():
        for i, size in enumerate(sizes):
            write_jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", size, seed=i)
    write_jpeg(root / "val" / "n01" / "v0.JPEG", (45, 50), color=(200, 100, 50))
    write_jpeg(root / "val" / "n02" / "v1.JPEG", (40, 40), seed=7)
    write_jpeg(root / "val" / "n02" / "v2.jpg", (64, 48), seed=8)


# --------------------------------------------------------------------------------------------
# digits and MNIST-1D.


def test_digits():
    data = load_dataset("digits")
    assert isinstance(data, Dataset)
    assert data.train_x.shape == (1437, 8, 8, 1) and data.test_x.shape == (360, 8, 8, 1)
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
    assert data.num_classes == 10 and data.input_shape == (8, 8, 1)
    assert abs(data.train_x.mean()) < 1e-4 and abs(data.train_x.std() - 1) < 1e-4
    assert set(np.unique(data.test_y)) == set(range(10))  # stratified
    counts = np.bincount(data.test_y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.train_y, data.train_y)
    assert not np.array_equal(load_dataset("digits", seed=1).train_y, data.train_y)
    with pytest.raises(ValueError, match="'mnist' has a fixed train/test split"):
        load_dataset("mnist", seed=1)


@pytest.fixture(scope="module")
def mnist1d_arrays():
    return small_mod.generate_mnist1d()


def test_mnist1d_generation_restores_global_rngs(monkeypatch):
    import mnist1d.data

    def fake_make_dataset(args):  # like the real one, it reseeds the global RNGs
        random.seed(args.seed)
        np.random.seed(args.seed)  # noqa: NPY002
        return {"x": np.zeros((2, 40)), "y": [0, 1], "x_test": np.zeros((1, 40)), "y_test": [2]}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    np_before = np.random.get_state()[1].copy()  # noqa: NPY002
    py_before = random.getstate()
    arrays = small_mod.generate_mnist1d()
    assert arrays["x"].shape == (2, 40)
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)  # noqa: NPY002
    assert random.getstate() == py_before


def test_mnist1d_dataset_and_cache(tmp_path, monkeypatch, mnist1d_arrays):
    monkeypatch.setattr(small_mod, "generate_mnist1d", lambda: dict(mnist1d_arrays))
    data = load_dataset("mnist1d")
    assert data.train_x.shape == (4000, 40, 1) and data.test_x.shape == (1000, 40, 1)
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
    assert data.input_shape == (40, 1) and data.num_classes == 10
    assert set(np.unique(data.train_y)) == set(range(10))
    assert not any(tmp_path.iterdir())  # nothing cached without data_dir

    cached = load_dataset("mnist1d", tmp_path)
    assert (tmp_path / "mnist1d" / "mnist1d_default.npz").is_file()

    def fail():
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(small_mod, "generate_mnist1d", fail)
    again = load_dataset("mnist1d", tmp_path)
    np.testing.assert_array_equal(again.train_x, cached.train_x)
    np.testing.assert_array_equal(again.test_y, data.test_y)


def test_mnist1d_data_seed_generates_and_caches_its_own_draw(tmp_path, monkeypatch, mnist1d_arrays):
    seeds = []

    def generate(seed=None):
        seeds.append(seed)
        return dict(mnist1d_arrays)

    monkeypatch.setattr(small_mod, "generate_mnist1d", generate)
    load_dataset("mnist1d", tmp_path, seed=3)
    assert seeds == [3] and (tmp_path / "mnist1d" / "mnist1d_seed3.npz").is_file()
    assert not (tmp_path / "mnist1d" / "mnist1d_default.npz").exists()


def test_mnist1d_matches_package_defaults(mnist1d_arrays):
    assert mnist1d_arrays["x"].shape == (4000, 40)
    assert mnist1d_arrays["x_test"].shape == (1000, 40)
    # Default mnist1d arguments: 5000 samples, 80/20 split, 10 balanced classes.
    y = np.concatenate([mnist1d_arrays["y"], mnist1d_arrays["y_test"]])
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)
    x = np.concatenate([mnist1d_arrays["x"], mnist1d_arrays["x_test"]])
    assert abs(x.mean()) < 1e-6 and abs(x.std() - 1) < 1e-6


# --------------------------------------------------------------------------------------------
# MNIST (IDX).


@pytest.mark.parametrize(
    "gz, subdir", [(True, "."), (False, "."), (True, "mnist"), (False, "MNIST/raw")]
)
def test_mnist_layouts(tmp_path, gz, subdir):
    arrays = write_mnist(tmp_path / subdir, gz)
    data = load_dataset("mnist", tmp_path)
    assert data.train_x.shape == (6, 28, 28, 1) and data.test_x.shape == (4, 28, 28, 1)
    assert data.train_x.dtype == np.float32 and data.test_y.dtype == np.int32
    expected = (arrays["train-images-idx3-ubyte"][..., None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(data.train_x, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert data.input_shape == (28, 28, 1) and data.num_classes == 10


def test_parse_idx_dtypes_and_errors():
    ints = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    np.testing.assert_array_equal(parse_idx(idx_bytes(ints, 0x0C)), ints)
    floats = np.linspace(0, 1, 4, dtype=np.float32)
    np.testing.assert_array_equal(parse_idx(idx_bytes(floats, 0x0D)), floats)
    with pytest.raises(ValueError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="truncated IDX header"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00")


def test_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte") as err:
        load_dataset("mnist", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\] in "):
        load_dataset("mnist", tmp_path)


def test_mnist_malformed(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    good = path.read_bytes()
    path.write_bytes(good[:-10])  # truncated
    with pytest.raises(ValueError, match="size mismatch") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)
    path.write_bytes(b"\x12\x34" + good[2:])  # wrong magic
    with pytest.raises(ValueError, match="bad magic"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(good)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))  # 5 labels for 6 images
    with pytest.raises(ValueError, match="expected 6 labels"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("shape, message", [((0, 28, 28), "holds no images"), ((4, 0, 0), "0x0")])
def test_mnist_empty_or_degenerate_images_are_refused_naming_the_file(tmp_path, shape, message):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros(shape, np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(shape[0], np.uint8)))
    with pytest.raises(ValueError, match=message) as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


def test_mnist_truncated_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="corrupt gzip") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------
# Downloads (never touching the network).


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(download_mod, "_fetch_url", lambda url, dest: dest.write_bytes(b"evil"))
    dest = tmp_path / "sub" / "file.bin"
    with pytest.raises(ValueError, match="md5 checksum mismatch"):
        download_file("https://example.invalid/file.bin", dest, md5="0" * 32)
    assert list((tmp_path / "sub").iterdir()) == []

    good = hashlib.md5(b"evil").hexdigest()
    sha = hashlib.sha256(b"evil").hexdigest()
    assert download_file("https://example.invalid/f", dest, md5=good, sha256=sha) == dest
    assert dest.read_bytes() == b"evil"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["file.bin"]


def test_download_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(url, dest):
        dest.write_bytes(b"partial")
        raise OSError("connection reset")

    monkeypatch.setattr(download_mod, "_fetch_url", broken)
    with pytest.raises(OSError, match="connection reset"):
        download_file("https://example.invalid/x", tmp_path / "x", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_load_with_download_verifies_checksums(tmp_path, monkeypatch, name):
    urls = []

    def fake_fetch(url, dest):
        urls.append(url)
        dest.write_bytes(b"not the real file")

    monkeypatch.setattr(download_mod, "_fetch_url", fake_fetch)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_dataset(name, tmp_path, download=True)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    expected_host = "ossci-datasets.s3.amazonaws.com" if name == "mnist" else "www.cs.toronto.edu"
    assert urls and expected_host in urls[0]


def test_download_only_for_supported_datasets():
    with pytest.raises(ValueError, match="download=True is only supported"):
        load_dataset("imagenet", download=True)


# --------------------------------------------------------------------------------------------
# CIFAR.


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tarball_and_folder_agree(tmp_path, name):
    spec = CIFAR_SPECS[name]
    raw = write_cifar(tmp_path / "tar", name, tarball=True)
    write_cifar(tmp_path / "dir", name, tarball=False)  # same seed: same contents
    from_tar = load_dataset(name, tmp_path / "tar")
    from_dir = load_dataset(name, tmp_path / "dir")
    from_folder_itself = load_dataset(name, tmp_path / "dir" / spec.folder)
    n_train = 3 * len(spec.train_files)
    for data in (from_tar, from_dir, from_folder_itself):
        assert data.train_x.shape == (n_train, 32, 32, 3) and data.test_x.shape == (3, 32, 32, 3)
        assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
        assert data.num_classes == spec.num_classes and data.input_shape == (32, 32, 3)
        np.testing.assert_array_equal(data.train_y, raw["train"][1])
        np.testing.assert_array_equal(data.test_y, raw["test"][1])
    np.testing.assert_array_equal(from_tar.train_x, from_dir.train_x)
    # Rows are CHW: pixel (row r, col c) of channel k is data[k * 1024 + r * 32 + c].
    data_row = raw["train"][0][1]
    for k, r, c in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        value = data_row[k * 1024 + r * 32 + c] / 255.0
        expected = (value - from_tar.mean[k]) / from_tar.std[k]
        assert from_tar.train_x[1, r, c, k] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_cifar_normalisation_stats(tmp_path):
    write_cifar(tmp_path, "cifar10", tarball=False, n=40)
    data = load_dataset("cifar10", tmp_path)
    # By default: the training images' own per-channel statistics, so train is standardised.
    np.testing.assert_allclose(data.train_x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.train_x.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    # Uniform random pixels: mean 0.5, std ~0.289 before normalisation.
    np.testing.assert_allclose(data.mean, 0.5, atol=0.02)
    np.testing.assert_allclose(data.std, 1 / np.sqrt(12), rtol=0.02)
    # With the official code's values (kept for parity runs).
    official = load_dataset("cifar10", tmp_path, official_normalization=True)
    spec = CIFAR_SPECS["cifar10"]
    assert official.mean == spec.official_mean and official.std == spec.official_std
    expected_mean = (0.5 - np.array(spec.official_mean)) / np.array(spec.official_std)
    expected_std = (1 / np.sqrt(12)) / np.array(spec.official_std)
    np.testing.assert_allclose(official.train_x.mean(axis=(0, 1, 2)), expected_mean, atol=0.02)
    np.testing.assert_allclose(official.train_x.std(axis=(0, 1, 2)), expected_std, rtol=0.02)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-python.tar.gz" in str(err.value) and str(tmp_path) in str(err.value)

    write_cifar(tmp_path, "cifar10", tarball=False)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: expected uint8 data of shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").unlink()
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("tarball", [False, True])
def test_cifar_empty_test_batch_is_refused_naming_it(tmp_path, tarball):
    write_cifar(tmp_path, "cifar10", tarball=False)
    folder = tmp_path / "cifar-10-batches-py"
    empty = {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}
    (folder / "test_batch").write_bytes(pickle.dumps(empty, protocol=2))
    if tarball:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        shutil.rmtree(folder)
    with pytest.raises(ValueError, match=r"test_batch: holds no images"):
        load_dataset("cifar10", tmp_path)


def test_cifar_malformed_tarball(tmp_path):
    write_cifar(tmp_path, "cifar100", tarball=True)
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cifar-100-python.tar.gz") as err:
        load_dataset("cifar100", tmp_path)
    assert str(archive) in str(err.value)
    with tarfile.open(archive, "w:gz") as tar:  # a tarball without the test file
        payload = pickle.dumps(cifar_batch(np.random.default_rng(0), 2, "fine_labels", 100)[0])
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="missing member cifar-100-python/test"):
        load_dataset("cifar100", tmp_path)


def test_augment_cifar_crops_and_flips():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    out = augment_cifar(np.random.default_rng(1), batch)
    assert out.shape == batch.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, augment_cifar(1, batch))  # deterministic by seed
    assert not np.array_equal(out, augment_cifar(2, batch))
    pad_value = np.array([-9.0, -8.0, -7.0], np.float32)
    out = augment_cifar(3, batch, pad_value=pad_value)
    padded = np.pad(batch, ((0, 0), (4, 4), (4, 4), (0, 0)))
    padded[:, :4], padded[:, -4:], padded[:, :, :4], padded[:, :, -4:] = (pad_value,) * 4
    flips = 0
    for i in range(len(batch)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                out[i],
                padded[i, dy : dy + 32, dx : dx + 32][:, ::-1]
                if flip
                else padded[i, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert matches, f"sample {i} is not a (flipped) 32x32 crop of the padded image"
        flips += matches[0][2]
    # No padding and a fixed seed: each output is the image or its mirror image.
    out = augment_cifar(4, batch, padding=0)
    for i in range(len(batch)):
        assert np.array_equal(out[i], batch[i]) or np.array_equal(out[i], batch[i, :, ::-1])


# --------------------------------------------------------------------------------------------
# ImageNet.


@pytest.fixture
def imagenet_root(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    return tmp_path


def test_imagenet_scan(imagenet_root):
    data = load_dataset("imagenet", imagenet_root, image_size=32, num_workers=0)
    assert isinstance(data, ImageNetData)
    assert data.root == imagenet_root / "imagenet"
    assert data.classes == ("n01", "n02") and data.num_classes == 2
    assert data.num_train == 5 and data.num_val == 3
    assert data.input_shape == (32, 32, 3) and data.resize_size == 37  # 32 * 256 / 224


def test_imagenet_train_loader(imagenet_root):
    data = load_dataset("imagenet", imagenet_root, image_size=32, num_workers=0)
    batches = list(data.train_loader(2, seed=0, epoch=0))
    assert len(batches) == 2  # 5 images, drop_remainder
    for x, y in batches:
        assert x.shape == (2, 32, 32, 3) and x.dtype == np.float32
        assert y.shape == (2,) and y.dtype == np.int32
        assert np.isfinite(x).all() and -3.0 < x.min() and x.max() < 3.0
    again = list(data.train_loader(2, seed=0, epoch=0))
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    full = list(data.train_loader(2, seed=0, epoch=1, drop_remainder=False))
    labels = np.concatenate([y for _, y in full])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    other = np.concatenate([x for x, _ in full])
    assert not np.array_equal(other[:4], np.concatenate([x for x, _ in batches]))


def test_imagenet_eval_loader(imagenet_root):
    data = load_dataset("imagenet", imagenet_root, image_size=32, resize_size=40)
    batches = list(data.eval_loader(2))
    assert [x.shape for x, _ in batches] == [(2, 32, 32, 3), (1, 32, 32, 3)]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), [0, 1, 1])
    # The solid-colour image normalises to (colour / 255 - mean) / std everywhere.
    expected = (np.array([200, 100, 50]) / 255.0 - np.array(IMAGENET_MEAN)) / IMAGENET_STD
    np.testing.assert_allclose(batches[0][0][0], np.broadcast_to(expected, (32, 32, 3)), atol=0.05)
    # A random image: shorter side resized to 40, then the central 32x32.
    img = Image.open(imagenet_root / "imagenet" / "val" / "n02" / "v2.jpg").convert("RGB")
    img = img.resize((53, 40), Image.Resampling.BILINEAR).crop((10, 4, 42, 36))
    manual = (np.asarray(img) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(batches[1][0][0], manual, atol=1e-5)


def test_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<wnid>/\*\.JPEG") as err:
        load_dataset("imagenet", tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_dataset("imagenet", tmp_path)
    write_jpeg(tmp_path / "train" / "n01" / "a.JPEG", (20, 20))
    write_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", (20, 20))
    with pytest.raises(ValueError, match="loose images"):
        load_dataset("imagenet", tmp_path)
    write_jpeg(tmp_path / "val" / "n99" / "b.JPEG", (20, 20))
    with pytest.raises(ValueError, match="classes not in"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="resize_size"):
        load_dataset("imagenet", tmp_path, image_size=32, resize_size=16)


def write_numbered_imagenet(root: Path, n_train: int) -> None:
    """n_train training images of 3 classes, image i a solid colour whose red is 10 * i (so
    any crop of it tells which image it is), and one validation image per class."""
    for i in range(n_train):
        write_jpeg(
            root / "train" / f"n{i % 3}" / f"{i}.JPEG", (30 + i, 40), color=(10 * i, 90, 160)
        )
    for c in range(3):
        write_jpeg(root / "val" / f"n{c}" / f"v{c}.JPEG", (40, 40), color=(10 * c, 90, 160))


def image_numbers(x: np.ndarray) -> list[int]:
    red = np.asarray(x)[..., 0].mean(axis=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return np.round(red * 255 / 10).astype(int).tolist()


def test_imagenet_every_image_once_whatever_the_workers(tmp_path):
    """Batches are cut before the workers share them: with two spawned workers, an epoch of 24
    images in batches of 5 uses 20 distinct images, the same batches as without workers (each
    worker used to batch its own slice and drop its own remainder). Workers start in seconds."""
    write_numbered_imagenet(tmp_path, 24)
    epochs = {}
    for workers in (0, 2):
        data = load_dataset("imagenet", tmp_path, image_size=16, num_workers=workers)
        epochs[workers] = [(np.array(x), np.array(y)) for x, y in data.train_loader(5, seed=1)]
    batches = epochs[2]
    assert [x.shape for x, _ in batches] == [(5, 16, 16, 3)] * 4
    used = [n for x, _ in batches for n in image_numbers(x)]
    assert len(set(used)) == 20 and set(used) <= set(range(24))
    for x, y in batches:
        assert [n % 3 for n in image_numbers(x)] == y.tolist()
    for (x0, y0), (x2, y2) in zip(epochs[0], batches, strict=True):
        np.testing.assert_array_equal(x0, x2)
        np.testing.assert_array_equal(y0, y2)


def test_imagenet_last_partial_batch_without_workers(tmp_path):
    write_numbered_imagenet(tmp_path, 12)
    data = load_dataset("imagenet", tmp_path, image_size=8, num_workers=0)
    batches = list(data.train_loader(5, drop_remainder=False))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert sorted(n for x, _ in batches for n in image_numbers(x)) == list(range(12))
    assert [image_numbers(x) for x, _ in data.eval_loader(2)] == [[0, 1], [2]]


def test_imagenet_empty_class_folders_are_refused(imagenet_root):
    root = imagenet_root / "imagenet"
    (root / "train" / "n03").mkdir()
    (root / "val" / "n02" / "v1.JPEG").unlink()
    (root / "val" / "n02" / "v2.jpg").unlink()
    with pytest.raises(ValueError, match="without images") as err:
        load_dataset("imagenet", imagenet_root)
    assert "train/n03, val/n02" in str(err.value) and str(root) in str(err.value)


def test_imagenet_stray_entries_are_refused_and_hidden_ones_ignored(imagenet_root):
    root = imagenet_root / "imagenet"
    (root / "train" / ".cache").mkdir()  # Hidden: neither a class nor a stray.
    (root / "train" / "n01" / ".DS_Store").write_bytes(b"x")
    assert load_dataset("imagenet", imagenet_root).classes == ("n01", "n02")
    (root / "train" / "n01" / "notes.txt").write_text("x")
    (root / "train" / "n02" / "more").mkdir()
    (root / "train" / "labels.csv").write_text("x")
    (root / "val" / "ground_truth.txt").write_text("x")
    with pytest.raises(ValueError, match="neither images") as err:
        load_dataset("imagenet", imagenet_root)
    for stray in ("train/labels.csv", "train/n01/notes.txt", "train/n02/more/", "val/ground_truth"):
        assert stray in str(err.value)
    assert "without images" not in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_imagenet_corrupt_image_is_named(imagenet_root, damage):
    bad = imagenet_root / "imagenet" / "val" / "n02" / "v1.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
    data = load_dataset("imagenet", imagenet_root, image_size=16, num_workers=0)
    with pytest.raises(CorruptImageError, match=f"cannot decode image {bad}"):
        list(data.eval_loader(2))


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="only apply to 'imagenet'"):
        load_dataset("digits", image_size=32)


def test_imagenet_train_loader_shards_per_process(tmp_path):
    """Each process of a multi-host run decodes only its own, disjoint, share of every epoch."""
    from fake_data import write_imagenet

    from benchmarks.data import load_imagenet

    data = load_imagenet(
        write_imagenet(tmp_path / "inet", per_class=6), image_size=16, num_workers=0
    )
    whole = [y for _, ys in data.train_loader(4, seed=3, epoch=1) for y in ys]
    parts = [
        [
            y
            for _, ys in data.train_loader(2, seed=3, epoch=1, shard_index=i, shard_count=2)
            for y in ys
        ]
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == 6
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    with pytest.raises(ValueError, match="shard_index 2"):
        next(data.train_loader(2, shard_index=2, shard_count=2))
