"""Tiny datasets written in the real on-disk formats (IDX, CIFAR python tarball, ImageNet folders)."""

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, then the data."""
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.tobytes()


def write_mnist(
    root: Path, n_train: int = 64, n_test: int = 32, gz: bool = True, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in files.items():
        data = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return root


def _cifar_batch(rng, n: int, label_key: str, num_classes: int) -> bytes:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return pickle.dumps({b"data": data, label_key.encode(): list(np.arange(n) % num_classes)})


def write_cifar(
    root: Path, kind: str = "cifar10", n_per_batch: int = 16, tarball: bool = True, seed: int = 0
) -> Path:
    """The "CIFAR python version": a tarball (default) or its extracted folder, under root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        members = {
            f"data_batch_{i}": _cifar_batch(rng, n_per_batch, "labels", 10) for i in range(1, 6)
        }
        members["test_batch"] = _cifar_batch(rng, n_per_batch, "labels", 10)
    else:
        folder, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        members = {
            "train": _cifar_batch(rng, 5 * n_per_batch, "fine_labels", 100),
            "test": _cifar_batch(rng, n_per_batch, "fine_labels", 100),
        }
    if tarball:
        with tarfile.open(root / archive, "w:gz") as tar:
            for name, payload in members.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (root / folder).mkdir(exist_ok=True)
        for name, payload in members.items():
            (root / folder / name).write_bytes(payload)
    return root


def write_imagenet(
    root: Path, classes=("n01440764", "n01443537"), per_class: int = 4, seed: int = 0
) -> Path:
    """``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` with small JPEGs of varied sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for wnid in classes:
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(40, 80, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{wnid}_{i}.JPEG", format="JPEG")
    return root
