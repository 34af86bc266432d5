"""Test settings: 8 fake CPU devices for the sharding tests, and strict numerics."""

import os

# Must be set before JAX initialises its backends; the subprocesses and notebook kernels the tests
# start inherit them. Eight fake CPU devices for the sharding tests. LLVM optimisation off: the
# suite's programs are tiny, so compiling them costs far more than running them, and level 0
# compiles several times faster (a truncated-normal initialiser: about 2 s -> 0.3 s of CPU). It
# changes only the machine code XLA emits, not its HLO or fusions; results agree with an
# optimised build to float32 rounding.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (parity with the float64 PyTorch reference)."""
    with jax.enable_x64(True):
        yield
