"""The in-memory ``Dataset`` container and small helpers shared by the loaders."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = "data"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset: float32 inputs (images NHWC, normalised) and int32 labels.

    ``mean``/``std`` are the per-channel statistics used for normalisation (in the
    units of the raw pixels scaled to [0, 1]), where applicable.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.shape[0] == 0:
                raise ValueError(f"{split}: no examples")
            if 0 in tuple(self.input_shape):
                raise ValueError(f"{split}: inputs of shape {tuple(self.input_shape)} hold nothing")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{split}: {x.shape[0]} inputs but {y.shape[0]} labels")
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{split}: input shape {x.shape[1:]} != input_shape {self.input_shape}"
                )

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as a Path; None means ``./data``."""
    return Path(DEFAULT_DATA_DIR if data_dir is None else data_dir).expanduser()


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(x - mean) / std`` over the last axis, as float32."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    out = np.asarray(x, dtype=np.float32) - mean
    out /= std
    return out
