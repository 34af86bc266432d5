"""A CIFAR-10-shaped image task generated offline: 32x32 RGB images of 10 kinds of shape.

For machines without CIFAR-10: the same tensor shapes (``(N, 32, 32, 3)``, 10 classes), small
enough to train a VGG on a CPU, and not trivially separable. Each image is a coloured shape of one
of 10 kinds (the label) at a random position, size and colour, on a background of a random colour
with a random linear shading, with one small distractor blob of another colour and pixel noise.
Everything is drawn from ``numpy.random.default_rng(seed)``, so the set is the same on every
machine.
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks.cache import cache_dir, cached_arrays
from benchmarks.data.base import Dataset, normalize

SHAPES_NUM_TRAIN = 5000
SHAPES_NUM_TEST = 1000
SHAPES_SIZE = 32
SHAPE_NAMES = (
    "disc",
    "ring",
    "square",
    "frame",
    "triangle",
    "plus",
    "cross",
    "horizontal bars",
    "vertical bars",
    "diamond",
)


def _mask(kind: int, yy: np.ndarray, xx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of shape ``kind`` of radius ``r`` centred at 0 on the grid (yy, xx)."""
    ay, ax = np.abs(yy), np.abs(xx)
    dist = np.sqrt(yy**2 + xx**2)
    bar = max(1.5, r / 3.5)
    if kind == 0:
        return dist <= r
    if kind == 1:
        return (dist <= r) & (dist >= r - bar)
    if kind == 2:
        return (ay <= r * 0.8) & (ax <= r * 0.8)
    if kind == 3:
        return (ay <= r * 0.8) & (ax <= r * 0.8) & ((ay >= r * 0.8 - bar) | (ax >= r * 0.8 - bar))
    if kind == 4:
        return (yy <= r * 0.7) & (yy >= -r) & (ax <= (yy + r) * 0.55)
    if kind == 5:
        return ((ay <= bar / 2 + 0.5) & (ax <= r)) | ((ax <= bar / 2 + 0.5) & (ay <= r))
    if kind == 6:
        return ((np.abs(yy - xx) <= bar * 0.75) | (np.abs(yy + xx) <= bar * 0.75)) & (dist <= r)
    if kind == 7:
        return (ay <= r) & (ax <= r) & (np.floor((yy + r) / bar) % 2 == 0)
    if kind == 8:
        return (ay <= r) & (ax <= r) & (np.floor((xx + r) / bar) % 2 == 0)
    return ay + ax <= r


def generate_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, 32, 32, 3)`` in [0, 1] (float32) and their labels (int32)."""
    rng = np.random.default_rng(seed)
    size = SHAPES_SIZE
    grid = np.arange(size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    labels = rng.integers(0, len(SHAPE_NAMES), n).astype(np.int32)
    images = np.empty((n, size, size, 3), np.float32)
    for i, kind in enumerate(labels):
        background = rng.uniform(0.0, 1.0, 3)
        slope = rng.normal(0.0, 0.012, (2, 3))
        img = (
            background
            + (yy - size / 2)[..., None] * slope[0]
            + (xx - size / 2)[..., None] * slope[1]
        )
        # A distractor blob first, so the shape may cover it.
        cy, cx = rng.uniform(4, size - 4, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(2.0, 4.0) ** 2
        img[blob] = rng.uniform(0.0, 1.0, 3)
        r = rng.uniform(6.0, 11.0)
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        colour = rng.uniform(0.0, 1.0, 3)
        while np.abs(colour - background).sum() < 0.6:  # Keep the shape visible.
            colour = rng.uniform(0.0, 1.0, 3)
        img[_mask(int(kind), yy - cy, xx - cx, r)] = colour
        img += rng.normal(0.0, 0.08, img.shape)
        images[i] = np.clip(img, 0.0, 1.0)
    return images, labels


def _generate() -> dict[str, np.ndarray]:
    train_x, train_y = generate_shapes(SHAPES_NUM_TRAIN, 0)
    test_x, test_y = generate_shapes(SHAPES_NUM_TEST, 1)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _check(arrays: dict[str, np.ndarray]) -> None:
    image = (SHAPES_SIZE, SHAPES_SIZE, 3)
    expected = {
        "train_x": (SHAPES_NUM_TRAIN, *image),
        "train_y": (SHAPES_NUM_TRAIN,),
        "test_x": (SHAPES_NUM_TEST, *image),
        "test_y": (SHAPES_NUM_TEST,),
    }
    for key, shape in expected.items():
        if key not in arrays or tuple(arrays[key].shape) != shape:
            raise ValueError(f"malformed shapes data: {key!r}, expected shape {shape}")


@functools.cache  # Read once per process.
def load_shapes() -> Dataset:
    """The shapes task: 5000 train / 1000 test images of 32x32x3, 10 classes, normalised per
    channel with the training set's statistics. Train is drawn from seed 0 of the generator and
    test from seed 1, always. Generated once (a few seconds) and cached, with its checksum, in
    the program's cache folder (``benchmarks.cache``)."""
    arrays = cached_arrays(cache_dir("shapes") / "shapes_v1.npz", _generate, _check)
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    test_x, test_y = arrays["test_x"], arrays["test_y"]
    mean = tuple(float(m) for m in train_x.mean(axis=(0, 1, 2)))
    std = tuple(float(s) for s in train_x.std(axis=(0, 1, 2)))
    return Dataset(
        train_x=normalize(train_x, mean, std),
        train_y=train_y,
        test_x=normalize(test_x, mean, std),
        test_y=test_y,
        num_classes=len(SHAPE_NAMES),
        input_shape=(SHAPES_SIZE, SHAPES_SIZE, 3),
        mean=mean,
        std=std,
    )
