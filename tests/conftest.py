"""Test settings: 8 fake CPU devices for the sharding tests, and strict numerics."""

import os
import shutil
import tempfile

# Must be set before JAX initialises its backends; the subprocesses and notebook kernels the tests
# start inherit them. Eight fake CPU devices for the sharding tests. LLVM optimisation off: the
# suite's programs are tiny, so compiling them costs far more than running them, and level 0
# compiles several times faster (a truncated-normal initialiser: about 2 s -> 0.3 s of CPU). It
# changes only the machine code XLA emits, not its HLO or fusions; results agree with an
# optimised build to float32 rounding. A collective among the fake devices may wait for their
# threads up to 10 minutes (XLA's default, 40 s, aborts the process when the 2 cores are shared
# with other work and the 8 devices' threads fall behind).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The training program's cache folder (generated datasets, compiled programs): one per test
# session, shared by its workers and subprocesses, never the user's.
if "AGD_OPTAX_CACHE" not in os.environ:
    os.environ["AGD_OPTAX_CACHE"] = _SESSION_CACHE = tempfile.mkdtemp(prefix="agd_optax_test_")
else:
    _SESSION_CACHE = None

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (parity with the float64 PyTorch reference)."""
    with jax.enable_x64(True):
        yield


# The heaviest files, heaviest first (each takes 35 s to 2 min of CPU on a 2-core machine). With
# --dist loadfile (pyproject.toml) a file runs whole on one worker and files are handed out in
# collection order, so the long ones start first and the many short ones fill in at the end.
HEAVY_FIRST = (
    "tests/test_train.py",
    "tests/test_notebooks.py",
    "tests/test_contract.py",
    "tests/test_parallel.py",
    "tests/test_agd_momentum.py",
    "tests/test_runs_training.py",
    "tests/test_train_lm.py",
    "tests/test_overhead.py",
    "tests/test_stacking.py",
)


def pytest_sessionfinish(session, exitstatus):
    """The session's cache folder goes with it (made by the controller, shared by the workers)."""
    if _SESSION_CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
