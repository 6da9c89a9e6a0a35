"""Shared test fixtures: real CIFAR-10 location, an mpiexec runner, small run configs.

CIFAR-10 is found as `labtools data where` finds it (labtools.data.find_cifar_dir: $CIFAR10_DIR,
data/cifar-10-batches-py, ~/.keras/datasets/cifar-10-batches-py); no data is a skip. With $CI set, a
skip is a failure for a test that needed the data, and for any test marked slow, mpi or notebook
(pytest_runtest_makereport below): in CI a missing data path can never pass silently.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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


NO_DATA = "no CIFAR-10: "  # the start of every skip for missing data (the CI hook looks for it)
CI_STRICT_MARKS = ("slow", "mpi", "notebook")  # in CI, any skip of a test marked so is a failure


@pytest.fixture(scope="session")
def cifar_dir() -> str:
    """Real CIFAR-10, found exactly as `labtools data where` finds it. Missing data is a skip here,
    a failure in CI (pytest_runtest_makereport)."""
    from labtools.data import DataError, find_cifar_dir

    try:
        return str(find_cifar_dir(None, download=False).absolute())
    except DataError as e:
        pytest.skip(f"{NO_DATA}{e}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With $CI set, a test skipped for missing data, or any skipped test marked slow, mpi or notebook,
    is reported as a failure with one sentence saying why (an expected failure, xfail, stays one)."""
    rep = (yield).get_result()
    if not (os.environ.get("CI") and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    reason = reason.removeprefix("Skipped: ")
    marks = sorted({m.name for m in item.iter_markers()} & set(CI_STRICT_MARKS))
    if reason.startswith(NO_DATA):
        why, reason = "for missing data", reason[len(NO_DATA):]
    elif marks:
        why = f"(marked {', '.join(marks)})"
    else:
        return
    rep.outcome = "failed"
    rep.longrepr = f"CI is set, so {item.nodeid} may not skip {why}: {reason}"


def mpiexec() -> str:
    exe = shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not exe:
        pytest.fail("mpiexec not found: install the mpich wheel (pip install mpich) or a system MPI")
    return exe


def run_mpi(n: int, args: list[str], timeout: float = 600, env: dict | None = None,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m labtools.cli <args>` with the test's interpreter (environment: this
    one, plus env, less the variables named in unset)."""
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    for k in unset:
        e.pop(k, None)
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "labtools.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


# ---------------------------------------------------------------- the main job in a fresh clone

class FreshMain:
    """A fresh clone of this working tree (tracked and untracked-but-not-ignored files, committed in a new
    repository: what `git clone` of it would give) with CIFAR-10 in its data/ folder and CIFAR10_DIR
    unset, where the main job ran once, as `make main` runs it but with the smoke profile."""

    def __init__(self, root: Path, cifar_dir: str):
        self.root = root
        self.store = root / "results" / "local"   # where `make main` computes
        self.figures = root / "figures"           # figures/<profile>/
        self.env = {k: v for k, v in os.environ.items() if k not in ("CIFAR10_DIR", "LABTOOLS_RESULTS")}
        self.env.update(PYTHONPATH=str(root), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\0")
        for f in filter(None, files):
            src = REPO / f
            if src.is_file() and not src.is_symlink():
                (root / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, root / f)
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
            subprocess.run(git + cmd, cwd=root, check=True, capture_output=True)
        (root / "data" / "cifar-10-batches-py").symlink_to(Path(cifar_dir).resolve(), target_is_directory=True)

    def main(self, profile: str = "smoke", timeout: float = 1500) -> subprocess.CompletedProcess:
        """`make main`'s command (labtools reproduce into results/local) run in the clone, with this interpreter."""
        return subprocess.run([sys.executable, "-m", "labtools.cli", "reproduce", "--profile", profile, "--results",
                               "results/local"], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def git_status(self) -> list[str]:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=self.root,
                              capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.fixture(scope="session")
def fresh_main(cifar_dir, tmp_path_factory) -> FreshMain:
    """The smoke profile's main job, run once per session in a fresh clone (tests/test_notebooks.py reads its
    tables and figures; tests/test_newcomer.py runs it a second time)."""
    fm = FreshMain(tmp_path_factory.mktemp("fresh") / "labtools", cifar_dir)
    t0 = time.monotonic()
    r = fm.main()
    fm.first_run_s, fm.first_out, fm.first_err = time.monotonic() - t0, r.stdout, r.stderr
    assert r.returncode == 0, f"the main job failed in a fresh clone:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return fm
