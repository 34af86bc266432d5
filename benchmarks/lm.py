"""What the training program adds for language models: samples of generated text and the
corpus's identity in the run's summary."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks.config import Config
from benchmarks.data.text import TextData
from benchmarks.models.transformer import generate
from benchmarks.workdir import write_atomic

SAMPLES_FILE = "samples.txt"
SAMPLE_PROMPT = 48  # Bytes of validation text each sample starts from.
SAMPLE_LENGTH = 256  # Bytes generated per sample.
SAMPLE_TEMPERATURE = 0.8


def write_samples(path: str, model: nnx.Module, data: TextData, config: Config) -> str:
    """``config.samples`` continuations of validation-text prompts (evenly spaced through the
    validation split), each ``SAMPLE_LENGTH`` tokens at temperature ``SAMPLE_TEMPERATURE``."""
    n = config.samples
    prompt = min(SAMPLE_PROMPT, config.context, data.valid.shape[0])
    starts = np.linspace(0, data.valid.shape[0] - prompt, n).astype(np.int64)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 2), n)
    parts = [
        f"# {n} samples after training: {SAMPLE_LENGTH} tokens each at temperature "
        f"{SAMPLE_TEMPERATURE}, after a prompt of {prompt} tokens from the validation text.\n"
    ]
    for i, (start, key) in enumerate(zip(starts, keys)):
        ids = data.valid[start : start + prompt].astype(np.int32)
        out = generate(model, ids, SAMPLE_LENGTH, key, SAMPLE_TEMPERATURE)
        parts.append(
            f"\n=== sample {i + 1}: prompt ===\n{data.decode(ids)}\n"
            f"=== sample {i + 1}: generated ===\n{data.decode(np.asarray(out))}\n"
        )
    write_atomic(path, "".join(parts))
    return path


def lm_summary(data: TextData, config: Config, final: dict[str, Any]) -> dict[str, Any]:
    """Tokens per second and the corpus (its SHA-256, and the Python whose standard library it
    is) for the summary; losses are in nats per token (per byte)."""
    ips = final.get("images_per_second")
    return {
        "tokens_per_second": ips * config.context if ips else None,
        "loss_unit": "nats per byte",
        "corpus": data.describe(),
    }


def samples_path(workdir: str) -> str:
    return os.path.join(workdir, SAMPLES_FILE)
