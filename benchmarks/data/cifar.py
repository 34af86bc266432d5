"""CIFAR-10 / CIFAR-100 from the "CIFAR python version" files, and their augmentation."""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from benchmarks.data.base import Dataset, normalize, resolve_data_dir
from benchmarks.data.download import download_file


@dataclasses.dataclass(frozen=True)
class _CifarSpec:
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    official_mean: tuple[float, float, float]
    official_std: tuple[float, float, float]
    url: str
    md5: str


# official_mean/std: the values the official AGD code normalises with (its CIFAR-10 std values
# are not the per-channel std of the pixels, which is about 0.247, 0.243, 0.261). By default the
# loader uses the training set's own per-channel statistics instead.
CIFAR_SPECS = {
    "cifar10": _CifarSpec(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        official_mean=(0.4914, 0.4822, 0.4465),
        official_std=(0.2023, 0.1994, 0.2010),
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _CifarSpec(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        official_mean=(0.5071, 0.4867, 0.4408),
        official_std=(0.2675, 0.2565, 0.2761),
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _unpickle(data: bytes, source: str) -> dict[str, object]:
    # The CIFAR batches are Python 2 pickles of dicts with bytes keys. Only load files you trust.
    try:
        obj = pickle.loads(data, encoding="bytes")
    except Exception as e:
        raise ValueError(f"{source}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _parse_batch(data: bytes, source: str, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(data, source)
    if "data" not in batch or spec.label_key not in batch:
        raise ValueError(
            f"{source}: expected keys 'data' and {spec.label_key!r}, got {sorted(batch)}"
        )
    x = np.asarray(batch["data"])
    y = np.asarray(batch[spec.label_key])
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.dtype != np.uint8:
        raise ValueError(
            f"{source}: expected uint8 data of shape (N, 3072), got {x.dtype} {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{source}: holds no images (a CIFAR batch has at least one)")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{source}: {x.shape[0]} images but labels of shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(f"{source}: labels must be in 0..{spec.num_classes - 1}")
    images = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    return images, y.astype(np.int32)


def _read_folder(folder: Path, names: tuple[str, ...], spec: _CifarSpec) -> list[tuple]:
    out = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"expected {path} (CIFAR folder {folder} should contain "
                f"{', '.join(spec.train_files + spec.test_files)})"
            )
        out.append(_parse_batch(path.read_bytes(), str(path), spec))
    return out


def _read_tarball(archive: Path, spec: _CifarSpec) -> tuple[list[tuple], list[tuple]]:
    splits = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for names in (spec.train_files, spec.test_files):
                batches = []
                for name in names:
                    member = f"{spec.folder}/{name}"
                    try:
                        f = tar.extractfile(member)
                    except KeyError:
                        f = None
                    if f is None:
                        raise ValueError(f"{archive}: missing member {member}")
                    batches.append(_parse_batch(f.read(), f"{archive}:{member}", spec))
                splits.append(batches)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{archive}: unreadable tar archive ({type(e).__name__}: {e})") from e
    return splits[0], splits[1]


def _locate(root: Path, spec: _CifarSpec) -> tuple[str, Path] | None:
    for folder in (root / spec.folder, root):
        if (folder / spec.train_files[0]).is_file():
            return "folder", folder
    if (root / spec.archive).is_file():
        return "archive", root / spec.archive
    return None


def load_cifar(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    official_normalization: bool = False,
) -> Dataset:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels).

    Reads ``data_dir/cifar-10-batches-py/`` (resp. ``cifar-100-python/``), or that folder
    given directly as ``data_dir``, or else the tarball ``data_dir/cifar-10-python.tar.gz``
    (resp. ``cifar-100-python.tar.gz``) without extracting it. With ``download=True`` a
    missing tarball is downloaded (md5-verified). Images are ``(N, 32, 32, 3)`` float32,
    scaled to [0, 1] and normalised per channel with the mean and standard deviation of the
    training images (``channel_stats``), or, with ``official_normalization=True``, with the
    values of the official AGD code (``CIFAR_SPECS[name].official_mean``/``official_std``), for
    runs that must match it.
    """
    if name not in CIFAR_SPECS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_SPECS)}")
    spec = CIFAR_SPECS[name]
    root = resolve_data_dir(data_dir)
    found = _locate(root, spec)
    if found is None and download:
        download_file(spec.url, root / spec.archive, md5=spec.md5)
        found = _locate(root, spec)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found in {root}: expected the folder {root / spec.folder} "
            f"(with {', '.join(spec.train_files + spec.test_files)}) or the tarball "
            f"{root / spec.archive} (or pass download=True)"
        )
    kind, path = found
    if kind == "folder":
        train = _read_folder(path, spec.train_files, spec)
        test = _read_folder(path, spec.test_files, spec)
    else:
        train, test = _read_tarball(path, spec)

    def assemble(batches):
        x = np.concatenate([b[0] for b in batches]).astype(np.float32) / 255.0
        return x, np.concatenate([b[1] for b in batches])

    train_x, train_y = assemble(train)
    test_x, test_y = assemble(test)
    if official_normalization:
        mean, std = spec.official_mean, spec.official_std
    else:
        mean, std = channel_stats(train_x)
    train_x, test_x = normalize(train_x, mean, std), normalize(test_x, mean, std)
    return Dataset(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=spec.num_classes,
        input_shape=(32, 32, 3),
        mean=mean,
        std=std,
    )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation over every pixel of an NHWC array (float64 sums);
    a channel that never varies gets std 1 rather than a division by zero."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Dataset:
    """CIFAR-10; see ``load_cifar``."""
    return load_cifar("cifar10", data_dir, download=download)


def load_cifar100(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Dataset:
    """CIFAR-100 with the 100 fine labels; see ``load_cifar``."""
    return load_cifar("cifar100", data_dir, download=download)


def augment_cifar(
    rng: np.random.Generator | int,
    batch: np.ndarray,
    *,
    padding: int = 4,
    pad_value: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Random crop (``padding``-pixel padding, same output size) + random horizontal flip.

    Vectorised over an NHWC ``batch``; ``rng`` is a NumPy Generator or an int seed. The
    padding is filled with ``pad_value`` (scalar or per-channel); on normalised images
    the default 0 is the mean colour. To pad with black like torchvision's
    ``RandomCrop(32, padding=4)`` applied before normalisation, pass
    ``pad_value=-np.array(mean) / np.array(std)``.
    """
    rng = np.random.default_rng(rng)
    batch = np.asarray(batch)
    if batch.ndim != 4:
        raise ValueError(f"augment_cifar expects an NHWC batch, got shape {batch.shape}")
    n, h, w, c = batch.shape
    p = int(padding)
    if p > 0:
        padded = np.empty((n, h + 2 * p, w + 2 * p, c), dtype=batch.dtype)
        padded[...] = np.asarray(pad_value, dtype=batch.dtype)
        padded[:, p : p + h, p : p + w, :] = batch
    else:
        padded = batch
    top = rng.integers(0, 2 * p + 1, size=n)
    left = rng.integers(0, 2 * p + 1, size=n)
    flip = rng.random(n) < 0.5
    rows = top[:, None] + np.arange(h)[None, :]  # (n, h)
    offs = np.where(flip[:, None], np.arange(w - 1, -1, -1)[None, :], np.arange(w)[None, :])
    cols = left[:, None] + offs  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
