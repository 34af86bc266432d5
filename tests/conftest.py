"""Test settings: 8 fake CPU devices for the sharding tests, and strict numerics."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (parity with the float64 PyTorch reference)."""
    with jax.enable_x64(True):
        yield
