"""Shared test fixtures: real CIFAR-10 location, an mpiexec runner, small run configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# In-process training tests compare weights to 1e-4 after dozens of Adam steps, so they need the
# round-off of single-threaded kernels. TF's thread pools are fixed at its first op in a process;
# pin them here, before any test can start them with the default (all cores). Measured: with the
# default pools the eager reference loop of test_equivalence drifts to 1.14e-4 from the trainer.
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.constant(0.0) + 0.0  # start TF now, so no later call can change the pools

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar_dir() -> str:
    """Real CIFAR-10 from $CIFAR10_DIR. Missing data is a failure in CI, a skip elsewhere."""
    d = os.environ.get("CIFAR10_DIR")
    if d and Path(d, "data_batch_1").is_file():
        return d
    if os.environ.get("CI"):
        pytest.fail("CI must set CIFAR10_DIR to the CIFAR-10 python batches")
    pytest.skip("set CIFAR10_DIR to the cifar-10-batches-py folder to run training tests")


def mpiexec() -> str:
    exe = shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not exe:
        pytest.fail("mpiexec not found: install the mpich wheel (pip install mpich) or a system MPI")
    return exe


def run_mpi(n: int, args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m labtools.cli <args>` with the test's interpreter."""
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "labtools.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)
