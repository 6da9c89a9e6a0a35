"""Installs and runs where its users are (issue 27): the wheel is the whole package, a base install
trains without the notebook stack, a site MPI (Debian's Open MPI, loaded by mpi4py at run time) gives
the MPICH wheel's digests, every process agrees on the kernels, both kernels compile for aarch64.

One module so the wheel, its venv and the MPICH baselines are made once; the tests use them in file
order (the Open MPI test runs before the `mpich` extra enters the venv).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
TINY = ["--epochs", "1", "--limit-train", "96", "--limit-test", "48", "--threads", "1", "--quiet"]
OFF = {"LABTOOLS_FUSED_ADAM": "0", "LABTOOLS_MPI_OP": "0"}
OPENMPI = "mpirun.openmpi"  # Debian's openmpi-bin (.ci/run installs it)


def _record(out: Path, experiment: str) -> tuple[dict, dict]:
    d = next((out / experiment).glob("*/manifest.json")).parent
    return json.loads((d / "manifest.json").read_text()), json.loads((d / "summary.json").read_text())


def _clean_env(venv: Path | None = None, **extra) -> dict:
    """This environment without the dev venv on PATH (its mpicc/mpiexec are the MPICH wheel's)."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != Path(sys.executable).parent.resolve()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPI4PY_", "LABTOOLS_", "PMI", "OMPI_", "HYDRA"))}
    return {**env, "PATH": os.pathsep.join(([str(venv / "bin")] if venv else []) + path), **extra}


def _kernels_everywhere(m: dict) -> None:
    procs = m["kernels"]["processes"]
    assert len(procs) == 2 and all(p["fused_adam"] == "fused kernel" and p["mpi_op"] == "in-graph op" for p in procs), procs
    assert m["kernels"]["adam"] == "fused kernel" and m["kernels"]["allreduce"].startswith("in-graph op"), m["kernels"]


@pytest.fixture(scope="module")
def baseline(cifar_dir, tmp_path_factory) -> dict:
    """Final digests of the MPICH wheel (this venv) at P = 2: allreduce on the fallbacks, epoch-average."""
    out, got = tmp_path_factory.mktemp("baseline"), {}
    for sync, env in (("allreduce", OFF), ("epoch-average", {})):
        r = run_mpi(2, ["train", *TINY, "--sync", sync, "--cifar-dir", cifar_dir, "--out", str(out), "--experiment", sync],
                    env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        m, s = _record(out, sync)
        assert m["mpi_library"].startswith("MPICH"), m["mpi_library"]
        got[sync] = s["final_weight_digests"]
    assert len(set(got["allreduce"].values())) == 1  # synchronous: one model
    return got


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory) -> str:
    """The wheel venv's kernel cache, shared by its tests (fused Adam is built once)."""
    return str(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("labtools-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed non-editable, no extras: a compute node's install."""
    v = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(v)], check=True, timeout=120)
    r = subprocess.run([str(v / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return v


def test_the_wheel_is_the_whole_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("labtools/ops/adam_update.h", "labtools/ops/fused_adam.cc", "labtools/ops/mpi_allreduce.cc"):
        assert f in names, f
    data = [n for n in names if ".data/data/share/labtools/notebooks/" in n]
    assert any(n.endswith("/00_quickstart.py") for n in data) and any(n.endswith("/jupytext.toml") for n in data), data
    assert not any(n.endswith(".ipynb") for n in data), data  # generated, with whatever outputs a user saved
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    for role, pkgs in (("notebooks", ("jupyterlab", "papermill", "jupytext", "ipywidgets", "markdown", "ipyparallel")),
                       ("mpich", ("mpich",))):
        for p in pkgs:
            assert not any(r.split()[1].startswith(p) for r in base), f"{p} in the base install"
            assert any(r.split()[1].startswith(p) and f'extra == "{role}"' in r for r in requires), (p, role)


def test_base_install_has_no_notebook_stack_and_says_its_version(venv):
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('papermill', 'jupyterlab', "
                        "'jupytext', 'ipyparallel', 'matplotlib', 'mpich') if u.find_spec(m)])"], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = subprocess.run([str(venv / "bin" / "labtools"), "--version"], capture_output=True, text=True, timeout=60)
    from labtools import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"labtools {__version__}", r.stdout + r.stderr


def test_site_open_mpi_gives_the_mpich_wheels_digests(venv, baseline, kernel_cache, cifar_dir, tmp_path):
    """The README's site-MPI route: no `mpich` extra, mpi4py loads Debian's Open MPI at run time, its
    mpirun starts the ranks; the in-graph op is built against Open MPI's mpi.h, on every process."""
    if not shutil.which(OPENMPI):
        pytest.fail(f"{OPENMPI} not found: apt-get install openmpi-bin libopenmpi-dev (.ci/run does)")
    env = _clean_env(venv, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                     LABTOOLS_KERNEL_CACHE=kernel_cache)
    for sync in ("allreduce", "epoch-average"):
        t = time.time()
        r = subprocess.run([OPENMPI, "-n", "2", str(venv / "bin" / "labtools"), "train", *TINY, "--sync", sync,
                            "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", sync],
                           capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        m, s = _record(tmp_path, sync)
        assert m["mpi_library"].startswith("Open MPI") and m["status"] == "completed", m["mpi_library"]
        if sync == "allreduce":
            _kernels_everywhere(m)
        assert s["final_weight_digests"] == baseline[sync], (sync, s["final_weight_digests"], baseline[sync])
        print(f"Open MPI {sync}: {time.time() - t:.0f} s, digests {s['final_weight_digests']}")


def test_a_rank_without_a_kernel_turns_it_off_everywhere(baseline, cifar_dir, tmp_path):
    """Rank 0 without the in-graph op, rank 1 without the fused Adam kernel (each variable set on that
    rank only): alone, rank 0 would reduce on COMM_WORLD through mpi4py while rank 1 ran the sharded
    step on the ops' communicator, a hang. Agreed, both fall back, in seconds, to the fallback's bits."""
    from conftest import mpiexec

    args = ["-m", "labtools.cli", "train", *TINY, "--sync", "allreduce", "--cifar-dir", cifar_dir, "--out", str(tmp_path),
            "--experiment", "mixed", "--wait-limit", "120"]
    cmd = [mpiexec(), "-n", "1", "-env", "LABTOOLS_MPI_OP", "0", sys.executable, *args,
           ":", "-n", "1", "-env", "LABTOOLS_FUSED_ADAM", "0", sys.executable, *args]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={k: v for k, v in os.environ.items() if k not in OFF})
    assert r.returncode == 0 and time.time() - t < 150, r.stderr[-3000:]
    m, s = _record(tmp_path, "mixed")
    p0, p1 = m["kernels"]["processes"]
    assert p0["fused_adam"] == "fused kernel" and "LABTOOLS_MPI_OP=0" in p0["mpi_op"], p0
    assert p1["mpi_op"] == "in-graph op" and "LABTOOLS_FUSED_ADAM=0" in p1["fused_adam"], p1
    assert m["kernels"]["adam"].startswith("keras apply (process 1") and "sharded" not in m["kernels"]["allreduce"]
    assert m["kernels"]["allreduce"].startswith("mpi4py via numpy_function (process 0"), m["kernels"]
    assert "off on every process" in r.stderr
    assert s["final_weight_digests"] == baseline["allreduce"]


def test_wheel_with_the_mpich_extra_runs_both_kernels_on_every_rank(venv, wheel, baseline, kernel_cache, cifar_dir,
                                                                     tmp_path):
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[mpich]"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = _clean_env(venv, LABTOOLS_KERNEL_CACHE=kernel_cache)
    r = subprocess.run([str(venv / "bin" / "labtools"), "kernels", "build"], capture_output=True, text=True, env=env,
                       timeout=400)
    assert r.returncode == 0 and "FAILED" not in r.stdout, r.stdout + r.stderr[-2000:]
    r = subprocess.run([str(venv / "bin" / "mpiexec"), "-n", "2", str(venv / "bin" / "labtools"), "train", *TINY,
                        "--sync", "allreduce", "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "w"],
                       capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m, s = _record(tmp_path, "w")
    assert m["mpi_library"].startswith("MPICH")
    _kernels_everywhere(m)
    assert s["final_weight_digests"] == baseline["allreduce"]
    r = subprocess.run([str(venv / "bin" / "labtools"), "kernels", "check"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.count(" loads ") == 2, r.stdout + r.stderr[-2000:]


def test_reproduce_stored_only_from_outside_the_checkout(venv, wheel, tmp_path):
    """With the notebooks extra, the installed notebooks re-render stored records; cwd is not a checkout."""
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[notebooks]"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(venv / "bin" / "labtools"), "reproduce", "--profile", "paper", "--stored-only",
                        "--notebook", "01_batch_sweep", "--results", str(REPO / "results"), "--out", str(tmp_path / "figs")],
                       capture_output=True, text=True, env=_clean_env(venv), timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "figs" / "paper" / "executed" / "01_batch_sweep.ipynb").exists(), r.stdout
    assert any((tmp_path / "figs" / "paper").rglob("*.csv")), r.stdout


CROSS = "aarch64-linux-gnu-g++"


def test_both_kernels_cross_compile_for_aarch64(tmp_path):
    """The kernels compiled to aarch64 objects against TensorFlow's headers (the same flags as
    labtools.opbuild, less -shared): their Compute methods, which call adam_update, are emitted, and
    no x86 clone (target_clones) is asked of an ARM compiler."""
    if not shutil.which(CROSS):
        pytest.fail(f"{CROSS} not found: apt-get install g++-aarch64-linux-gnu (.ci/run does)")
    import tensorflow as tf

    from labtools import mpi_op, opbuild

    mpi_h = mpi_op._include_dir(mpi_op._loaded_libmpi())  # the MPICH wheel's mpi.h: the same on aarch64
    flags = [f for f in opbuild.FLAGS if f != "-shared"] + tf.sysconfig.get_compile_flags()
    procs = {name: subprocess.Popen([CROSS, *flags, f"-I{mpi_h}", "-c", str(opbuild.OPS / f"{name}.cc"), "-o",
                                     str(tmp_path / f"{name}.o")], stderr=subprocess.PIPE, text=True)
             for name in ("fused_adam", "mpi_allreduce")}
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err[-3000:]}"
    nm = shutil.which("aarch64-linux-gnu-nm") or "nm"
    for name, op in (("fused_adam", "LabtoolsAdamUpdateOp"), ("mpi_allreduce", "LabtoolsShardedAdamOp")):
        obj = tmp_path / f"{name}.o"
        assert obj.read_bytes()[18:20] == (183).to_bytes(2, "little"), f"{obj} is not an aarch64 ELF object"  # EM_AARCH64
        syms = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
        assert f"{op}::Compute" in syms, syms[-2000:]
        assert "resolver" not in syms and ".avx2" not in syms, "x86 clones in an aarch64 object"
