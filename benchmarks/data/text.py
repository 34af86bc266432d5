"""Byte-level text corpora for language models: one that needs no download, and local files.

* ``pystdlib``: the source of the Python standard library's top-level modules (``*.py`` directly in
  the folder of the running Python's standard library, sorted by name, concatenated). About 4.7 MB
  on Python 3.11; it depends on the Python version, so :class:`TextData` records the version and a
  SHA-256 of the bytes, and both go into every run's config and summary.
* ``text``: any local text file, or every file under a folder (sorted by relative path, hidden
  files skipped), e.g. tinyshakespeare's ``input.txt`` or enwik8.

Tokens are bytes. With ``vocab="compact"`` only the byte values that occur in the corpus get an id
(65 for tinyshakespeare instead of 256); losses are in nats per byte either way. The last
``valid_fraction`` of the bytes is the validation set (a split by position, so no window of the
validation text is ever seen in training).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig
from pathlib import Path

import numpy as np

TEXT_DATASETS = ("pystdlib", "text")
VOCABS = ("bytes", "compact")


@dataclasses.dataclass(frozen=True, eq=False)
class TextData:
    """A tokenised corpus split by position.

    Attributes:
      train, valid: token ids (``uint8`` or ``int32``), the first and last part of the corpus.
      vocab: ``vocab[id]`` is the byte value of token ``id``.
      name: the dataset's name.
      source: where the bytes came from (a path, or the standard library's folder).
      sha256: SHA-256 of the raw corpus bytes.
      python_version: the Python whose standard library made the corpus (``pystdlib`` only).
    """

    train: np.ndarray
    valid: np.ndarray
    vocab: np.ndarray
    name: str
    source: str
    sha256: str
    python_version: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.shape[0])

    def decode(self, ids) -> str:
        """Token ids as text (bytes decoded as UTF-8, invalid sequences replaced)."""
        return bytes(self.vocab[np.asarray(ids, np.int64)].tolist()).decode("utf-8", "replace")

    def encode(self, text: str) -> np.ndarray:
        """Text as token ids; a byte outside the vocabulary is an error."""
        raw = np.frombuffer(text.encode("utf-8"), np.uint8)
        lookup = np.full(256, -1, np.int32)
        lookup[self.vocab] = np.arange(self.vocab_size, dtype=np.int32)
        ids = lookup[raw]
        if (ids < 0).any():
            missing = sorted(set(raw[ids < 0].tolist()))
            raise ValueError(
                f"bytes {missing[:10]} of the text are not in {self.name}'s vocabulary"
            )
        return ids

    def describe(self) -> dict:
        """What identifies the corpus, for a run's config and summary."""
        out = {
            "dataset": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "train_tokens": int(self.train.shape[0]),
            "valid_tokens": int(self.valid.shape[0]),
        }
        if self.python_version is not None:
            out["python_version"] = self.python_version
        return out


def pystdlib_files() -> list[Path]:
    """The top-level ``*.py`` modules of the running Python's standard library, sorted by name."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library folder {folder}")
    return files


def text_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is a file, else every non-hidden file under it, by relative path."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"text corpus {str(path)!r} is neither a file nor a folder")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"the folder {str(path)!r} holds no (non-hidden) files")
    return files


def tokenize(
    raw: bytes,
    *,
    name: str,
    source: str,
    vocab: str = "bytes",
    valid_fraction: float = 0.1,
    python_version: str | None = None,
) -> TextData:
    """Splits ``raw`` by position into train and validation tokens."""
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {VOCABS}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    data = np.frombuffer(raw, np.uint8)
    if data.size < 2:
        raise ValueError(f"text corpus {source!r} has {data.size} bytes; it needs at least 2")
    if vocab == "bytes":
        table = np.arange(256, dtype=np.uint8)
        ids = data
    else:
        table, ids = np.unique(data, return_inverse=True)
        ids = ids.astype(np.uint8)
    n_valid = max(1, int(round(valid_fraction * data.size)))
    return TextData(
        train=ids[:-n_valid],
        valid=ids[-n_valid:],
        vocab=table.astype(np.uint8),
        name=name,
        source=source,
        sha256=hashlib.sha256(raw).hexdigest(),
        python_version=python_version,
    )


def load_text(
    name: str = "pystdlib",
    data_dir: str | os.PathLike | None = None,
    *,
    vocab: str = "bytes",
    valid_fraction: float = 0.1,
) -> TextData:
    """Loads a byte-level corpus by name (one of ``TEXT_DATASETS``).

    Args:
      name: ``"pystdlib"`` (no download; ``data_dir`` must be None) or ``"text"`` (``data_dir`` is
        a text file or a folder of them).
      data_dir: see ``name``.
      vocab: ``"bytes"`` (256 ids) or ``"compact"`` (the byte values that occur).
      valid_fraction: the last fraction of the corpus held out for validation.
    """
    if name == "pystdlib":
        if data_dir is not None:
            raise ValueError(
                "dataset 'pystdlib' is read from the Python standard library; use dataset 'text' "
                f"for the files in {str(data_dir)!r}"
            )
        files = pystdlib_files()
        source = str(files[0].parent)
        version = platform.python_version()
    elif name == "text":
        if data_dir is None:
            raise ValueError("dataset 'text' needs data_dir: a text file or a folder of them")
        files = text_files(data_dir)
        source = str(Path(data_dir).expanduser())
        version = None
    else:
        raise ValueError(f"unknown text dataset {name!r}; expected one of {TEXT_DATASETS}")
    raw = b"".join(p.read_bytes() for p in files)
    return tokenize(
        raw,
        name=name,
        source=source,
        vocab=vocab,
        valid_fraction=valid_fraction,
        python_version=version,
    )


def random_windows(
    tokens: np.ndarray, batch_size: int, length: int, rng: np.random.Generator
) -> np.ndarray:
    """``batch_size`` windows of ``length`` consecutive tokens at uniformly random offsets, as
    ``int32 (batch_size, length)``; a language model reads ``w[:, :-1]`` and predicts ``w[:, 1:]``."""
    if batch_size < 1 or length < 2:
        raise ValueError(f"need batch_size >= 1 and length >= 2, got {batch_size}, {length}")
    if tokens.shape[0] < length:
        raise ValueError(f"{tokens.shape[0]} tokens are fewer than one window of {length}")
    starts = rng.integers(0, tokens.shape[0] - length + 1, size=batch_size)
    return tokens[starts[:, None] + np.arange(length)].astype(np.int32)


def eval_windows(tokens: np.ndarray, length: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``length`` tokens covering ``tokens`` from the start (the tail
    shorter than a window is left out), or ``max_windows`` of them evenly spaced; ``int32``."""
    if length < 2:
        raise ValueError(f"need length >= 2, got {length}")
    count = tokens.shape[0] // length
    if count == 0:
        raise ValueError(
            f"{tokens.shape[0]} validation tokens are fewer than one window of {length}"
        )
    starts = np.arange(count) * length
    if max_windows is not None and max_windows < count:
        starts = starts[np.linspace(0, count - 1, max_windows).round().astype(np.int64)]
    return tokens[starts[:, None] + np.arange(length)].astype(np.int32)
