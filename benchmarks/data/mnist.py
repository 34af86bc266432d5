"""MNIST from the original IDX files (plain or gzipped)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from benchmarks.data.base import Dataset, normalize, resolve_data_dir
from benchmarks.data.download import download_file

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# Base file name -> md5 of its .gz version.
MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (magic ``00 00 <type> <ndim>``, big-endian dims)."""
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file (only {len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim < 1:
        raise ValueError(f"{source}: not an IDX file (bad magic number 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{source}: IDX size mismatch: header says shape {shape} ({expected} bytes) "
            f"but the file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gunzipping it if its name ends in ``.gz``."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt gzip file ({e})") from e
    return parse_idx(data, str(path))


def _candidate_dirs(root: Path) -> list[Path]:
    return [root, root / "mnist", root / "MNIST" / "raw"]


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_mnist_dir(root: Path) -> Path | None:
    """First of ``root``, ``root/mnist``, ``root/MNIST/raw`` holding the training images."""
    for directory in _candidate_dirs(root):
        if _find(directory, "train-images-idx3-ubyte") is not None:
            return directory
    return None


def download_mnist(root: str | os.PathLike) -> Path:
    """Download the four gzipped IDX files into ``root/mnist`` (md5-verified)."""
    directory = Path(root) / "mnist"
    for name, md5 in MNIST_FILES.items():
        if _find(directory, name) is None:
            download_file(MNIST_URL + name + ".gz", directory / (name + ".gz"), md5=md5)
    return directory


def _load_split(directory: Path, images_name: str, labels_name: str) -> tuple:
    paths = []
    for name in (images_name, labels_name):
        path = _find(directory, name)
        if path is None:
            raise FileNotFoundError(f"expected {name}[.gz] in {directory}")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{paths[0]}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{paths[0]}: holds no images")
    if 0 in images.shape[1:]:
        raise ValueError(
            f"{paths[0]}: images of {images.shape[1]}x{images.shape[2]} pixels (at least 1x1)"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{paths[1]}: expected {images.shape[0]} labels to match {paths[0]}, "
            f"got shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{paths[1]}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    x = normalize(images[..., None].astype(np.float32) / 255.0, MNIST_MEAN, MNIST_STD)
    return x, labels.astype(np.int32)


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Dataset:
    """MNIST from IDX files in ``data_dir`` (or ``data_dir/mnist``, ``data_dir/MNIST/raw``).

    Images are scaled to [0, 1] then normalised with mean 0.1307 / std 0.3081; shape
    ``(N, 28, 28, 1)``. With ``download=True`` missing files are fetched first.
    """
    root = resolve_data_dir(data_dir)
    directory = find_mnist_dir(root)
    if download and (directory is None or any(_find(directory, n) is None for n in MNIST_FILES)):
        directory = download_mnist(root)
    if directory is None:
        looked = ", ".join(str(d) for d in _candidate_dirs(root))
        raise FileNotFoundError(
            "MNIST not found: expected train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], "
            f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in one of: {looked} "
            "(or pass download=True)"
        )
    train_x, train_y = _load_split(directory, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    test_x, test_y = _load_split(directory, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"{directory}: train images {train_x.shape[1:]} and test images "
            f"{test_x.shape[1:]} differ in size"
        )
    return Dataset(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        input_shape=tuple(train_x.shape[1:]),
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )
