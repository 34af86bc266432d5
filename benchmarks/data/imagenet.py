"""Streaming ImageNet (ILSVRC-2012) loader: folder of JPEGs -> grain pipeline -> numpy batches.

Expected layout under ``data_dir`` (or ``data_dir/imagenet``)::

    train/<wnid>/*.JPEG
    val/<wnid>/*.JPEG

Images are decoded with PIL inside grain's pipeline (in worker processes when
``num_workers > 0``). Training: random-resized crop (scale 0.08-1, ratio 3/4-4/3) plus
horizontal flip; evaluation: resize the shorter side then center crop. Both normalise
with the ImageNet mean/std and yield ``(images float32 NHWC, labels int32)``.

The scan refuses, listing them, class folders without images (each would be an output class
that never appears) and entries that are neither images in a class folder nor class folders;
names starting with "." are ignored. An image that cannot be decoded raises
``CorruptImageError`` naming its path when its batch is read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.data.base import resolve_data_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


class _FileSource:
    """Random-access source of ``(path, label)`` records (compact, cheap to pickle)."""

    def __init__(self, root: Path, relpaths: np.ndarray, labels: np.ndarray):
        self.root = str(root)
        self.relpaths = relpaths  # bytes array, paths relative to root
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        rel = self.relpaths[index].decode("utf-8")
        return os.path.join(self.root, rel), int(self.labels[index])


class CorruptImageError(ValueError):
    """An image file that PIL cannot decode; the message names its path."""


def _open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise CorruptImageError(
            f"cannot decode image {path}: {type(e).__name__}: {e} (replace or delete the file)"
        ) from e


def _to_normalized_array(img) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32) / 255.0
    x -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return x


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Crop box ``(left, top, right, bottom)`` of a random-resized crop.

    Samples an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``,
    retrying up to 10 times; falls back to a central crop with the ratio clamped.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(
    record: tuple[str, int], rng: np.random.Generator, *, image_size: int
) -> tuple[np.ndarray, np.int32]:
    """Decode, random-resized-crop to ``image_size``, random flip, normalise."""
    from PIL import Image

    path, label = record
    img = _open_rgb(path)
    box = random_resized_crop_box(rng, img.width, img.height)
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_normalized_array(img), np.int32(label)


def eval_transform(
    record: tuple[str, int], *, image_size: int, resize_size: int
) -> tuple[np.ndarray, np.int32]:
    """Decode, resize the shorter side to ``resize_size``, center crop ``image_size``."""
    from PIL import Image

    path, label = record
    img = _open_rgb(path)
    w, h = img.size
    if w <= h:
        new_w, new_h = resize_size, int(resize_size * h / w)
    else:
        new_w, new_h = int(resize_size * w / h), resize_size
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - image_size) / 2.0))
    top = int(round((new_h - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    return _to_normalized_array(img), np.int32(label)


def _closing(it) -> Iterator:
    """Yield from a grain iterator and close it (stopping worker processes) at the end."""
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _ensure_absl_flags_parsed() -> None:
    # grain 0.2.x reads an absl flag when starting workers and fails with
    # UnparsedFlagAccessError outside absl.app (google/grain#1355); use the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _visible(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` whose names do not start with "." (hidden files are ignored)."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS


def _scan_split(split_dir: Path, class_index: dict[str, int], problems: dict[str, list[str]]):
    """(relative paths, labels) of a split's images; empty class folders and entries that are
    not images are added to ``problems`` rather than skipped."""
    relpaths, labels = [], []
    split = split_dir.name
    for e in _visible(split_dir):
        if not e.is_dir():
            problems["stray"].append(f"{split}/{e.name}")
    for wnid, label in class_index.items():
        class_dir = split_dir / wnid
        if not class_dir.is_dir():
            continue
        entries = _visible(class_dir)
        names = [e.name for e in entries if _is_image(e)]
        problems["stray"].extend(
            f"{split}/{wnid}/{e.name}{'/' if e.is_dir() else ''}"
            for e in entries
            if not _is_image(e)
        )
        if not names:
            problems["empty"].append(f"{split}/{wnid}")
        relpaths.extend(f"{split}/{wnid}/{n}".encode() for n in names)
        labels.extend([label] * len(names))
    return np.array(relpaths, dtype=np.bytes_), np.array(labels, dtype=np.int32)


def _raise_problems(root: Path, problems: dict[str, list[str]]) -> None:
    def listed(items: list[str]) -> str:
        more = f" and {len(items) - 8} more" if len(items) > 8 else ""
        return ", ".join(items[:8]) + more

    lines = []
    if problems["empty"]:
        lines.append(
            "class folders without images (each would add an output class that never "
            f"appears; delete them): {listed(problems['empty'])}"
        )
    if problems["stray"]:
        lines.append(
            f"entries that are neither images ({'/'.join(IMAGE_EXTENSIONS)}) in a class folder "
            "nor class folders (move or delete them; names starting with '.' are ignored): "
            f"{listed(problems['stray'])}"
        )
    if lines:
        raise ValueError(f"ImageNet folder {root}:\n  " + "\n  ".join(lines))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageNetData:
    """A scanned ImageNet folder with grain loaders; build it with ``load_imagenet``.

    Loaders yield ``(images, labels)``: float32 ``(B, image_size, image_size, 3)`` and
    int32 ``(B,)`` NumPy arrays (with workers, grain's shared-memory ndarray subclass).

    Attributes:
      root: the folder holding ``train/`` and ``val/``.
      classes: sorted wnids of ``train/``; label ``i`` is ``classes[i]``.
      image_size: side of the square crops (224 for ImageNet).
      resize_size: evaluation resize of the shorter side before the center crop.
      num_workers: grain worker processes (0 = decode in this process).
      num_threads: decoding threads per process.
    """

    root: Path
    classes: tuple[str, ...]
    train_source: _FileSource
    val_source: _FileSource
    image_size: int = 224
    resize_size: int = 256
    num_workers: int = 0
    num_threads: int = 8

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    @property
    def num_train(self) -> int:
        return len(self.train_source)

    @property
    def num_val(self) -> int:
        return len(self.val_source)

    def _finish(self, ds, batch_size: int, drop_remainder: bool) -> Iterator:
        import grain

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Batches are cut from the whole epoch before workers take their share (whole batches,
        # round robin): every image is in exactly one batch, only the epoch's last partial batch
        # is dropped, and the batches and their order do not depend on num_workers. Each
        # decoding thread then works on one batch.
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        read = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=max(self.num_threads, 2)
        )
        it = ds.to_iter_dataset(read)
        if self.num_workers > 0:
            _ensure_absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return _closing(iter(it))

    def train_loader(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        drop_remainder: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A generator over one epoch of shuffled, augmented training batches.

        Batches, order and augmentations are deterministic given ``(seed, epoch)``, whatever
        ``num_workers``; every image is in one batch of the epoch (with ``drop_remainder``, but
        the last ``len % batch_size``). Worker processes stop when the generator is exhausted
        or closed. With ``shard_count > 1``
        (one shard per process of a multi-host run) this process reads and decodes only every
        ``shard_count``-th image of the shuffled order, from ``shard_index``; ``batch_size`` is
        then the per-process batch.
        """
        import grain

        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
        ds = grain.MapDataset.source(self.train_source).shuffle(seed=_derive_seed(seed, epoch, 0))
        if shard_count > 1:
            usable = len(ds) - len(ds) % shard_count  # Every shard gets as many images.
            ds = ds[shard_index:usable:shard_count]
        ds = ds.random_map(
            functools.partial(train_transform, image_size=self.image_size),
            seed=_derive_seed(seed, epoch, 1),
        )
        return self._finish(ds, batch_size, drop_remainder)

    def eval_loader(
        self, batch_size: int, *, drop_remainder: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A generator over the validation batches (resize + center crop, no randomness).

        In file order, whatever ``num_workers``; the last batch may be partial.
        """
        import grain

        ds = grain.MapDataset.source(self.val_source).map(
            functools.partial(
                eval_transform, image_size=self.image_size, resize_size=self.resize_size
            )
        )
        return self._finish(ds, batch_size, drop_remainder)


def find_imagenet_root(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` or ``data_dir/imagenet``, whichever holds ``train/`` and ``val/``."""
    base = resolve_data_dir(data_dir)
    for root in (base, base / "imagenet"):
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    raise FileNotFoundError(
        f"ImageNet not found: expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG under "
        f"{base} or {base / 'imagenet'}"
    )


def load_imagenet(
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int = 224,
    resize_size: int | None = None,
    num_workers: int = 0,
    num_threads: int = 8,
) -> ImageNetData:
    """Scan an ImageNet folder (see the module docstring) and return an ``ImageNetData``.

    ``resize_size`` defaults to ``round(image_size * 256 / 224)`` (256 for 224 crops).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    if num_workers < 0 or num_threads < 0:
        raise ValueError("num_workers and num_threads must be >= 0")
    root = find_imagenet_root(data_dir)
    train_dir, val_dir = root / "train", root / "val"
    classes = tuple(e.name for e in _visible(train_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {train_dir}: expected train/<wnid>/*.JPEG")
    val_entries = _visible(val_dir)
    val_classes = {e.name for e in val_entries if e.is_dir()}
    if not val_classes and any(e.is_file() for e in val_entries):
        raise ValueError(
            f"{val_dir} holds loose images: expected val/<wnid>/*.JPEG "
            "(sort the validation images into one folder per class first)"
        )
    unknown = sorted(val_classes - set(classes))
    if unknown:
        raise ValueError(f"{val_dir} has classes not in {train_dir}: {unknown[:5]}")
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    problems: dict[str, list[str]] = {"empty": [], "stray": []}
    train_paths, train_labels = _scan_split(train_dir, class_index, problems)
    val_paths, val_labels = _scan_split(val_dir, class_index, problems)
    _raise_problems(root, problems)
    if len(train_labels) == 0:
        raise ValueError(f"no images (*.JPEG/*.jpg/*.png) found under {train_dir}/<wnid>/")
    if len(val_labels) == 0:
        raise ValueError(f"no images (*.JPEG/*.jpg/*.png) found under {val_dir}/<wnid>/")
    return ImageNetData(
        root=root,
        classes=classes,
        train_source=_FileSource(root, train_paths, train_labels),
        val_source=_FileSource(root, val_paths, val_labels),
        image_size=image_size,
        resize_size=resize_size,
        num_workers=num_workers,
        num_threads=num_threads,
    )
