"""Tests of the byte-level text corpora (benchmarks.data.text)."""

import platform

import numpy as np
import pytest

from benchmarks.data.text import (
    eval_windows,
    load_text,
    random_windows,
    text_files,
    tokenize,
)


def test_tokenize_splits_by_position():
    raw = bytes(range(100))
    data = tokenize(raw, name="t", source="mem", valid_fraction=0.2)
    np.testing.assert_array_equal(data.train, np.arange(80))
    np.testing.assert_array_equal(data.valid, np.arange(80, 100))
    assert data.vocab_size == 256
    assert data.decode(data.encode("hello")) == "hello"


def test_compact_vocabulary_keeps_only_the_bytes_that_occur():
    data = tokenize(b"abcabcabba", name="t", source="mem", vocab="compact", valid_fraction=0.3)
    assert data.vocab_size == 3
    np.testing.assert_array_equal(data.train, [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(data.valid, [1, 1, 0])
    assert data.decode(data.train) == "abcabca"
    with pytest.raises(ValueError, match="not in t's vocabulary"):
        data.encode("abz")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="vocab"):
        tokenize(b"abc", name="t", source="mem", vocab="words")
    with pytest.raises(ValueError, match="valid_fraction"):
        tokenize(b"abc", name="t", source="mem", valid_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        tokenize(b"a", name="t", source="mem")
    with pytest.raises(ValueError, match="unknown text dataset"):
        load_text("wikitext")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_text("text")
    with pytest.raises(ValueError, match="standard library"):
        load_text("pystdlib", "somewhere")
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        load_text("text", "/nonexistent/corpus.txt")


def test_local_file_and_folder(tmp_path):
    (tmp_path / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me.\n")
    one = load_text("text", tmp_path / "input.txt", vocab="compact")
    assert one.decode(np.concatenate([one.train, one.valid])).startswith("First Citizen:")
    assert one.python_version is None and one.describe()["vocab_size"] == one.vocab_size

    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_bytes(b"world")
    (folder / "a.txt").write_bytes(b"hello ")
    (folder / ".hidden").write_bytes(b"secret")
    (folder / "b" / ".git").mkdir()
    (folder / "b" / ".git" / "x").write_bytes(b"skip")
    assert [p.name for p in text_files(folder)] == ["a.txt", "2.txt"]
    data = load_text("text", folder, valid_fraction=0.25)
    assert data.decode(np.concatenate([data.train, data.valid])) == "hello world"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".only_hidden").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no \\(non-hidden\\) files"):
        load_text("text", empty)


def test_pystdlib_needs_no_download_and_records_its_python():
    data = load_text("pystdlib")
    info = data.describe()
    assert info["python_version"] == platform.python_version()
    assert len(info["sha256"]) == 64
    assert data.train.shape[0] > 1_000_000 and data.valid.shape[0] > 100_000
    text = data.decode(data.train[:20_000])
    assert "def " in text and "import " in text
    assert load_text("pystdlib").sha256 == data.sha256  # Deterministic.


def test_windows():
    tokens = np.arange(50, dtype=np.uint8)
    w = random_windows(tokens, 4, 9, np.random.default_rng(0))
    assert w.shape == (4, 9) and w.dtype == np.int32
    np.testing.assert_array_equal(np.diff(w, axis=1), 1)  # Consecutive tokens.
    assert w.max() < 50

    ev = eval_windows(tokens, 8)
    assert ev.shape == (6, 8)
    np.testing.assert_array_equal(ev.ravel(), np.arange(48))  # Non-overlapping, from the start.
    few = eval_windows(tokens, 8, max_windows=2)
    np.testing.assert_array_equal(few[:, 0], [0, 40])
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(tokens[:5], 8)
    with pytest.raises(ValueError, match="fewer than one window"):
        random_windows(tokens[:5], 1, 8, np.random.default_rng(0))
