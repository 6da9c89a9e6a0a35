"""labtools.cluster.Pool beyond one machine: engines on emulated hosts (network namespaces, Hydra's
ssh launcher through labtools.emulate's wrapper) and engines as a batch job of a real one-node Slurm
cluster (labtools.slurm_local).

Needs root (namespaces; slurmctld, slurmd, munged): not root is a failure when $CI is set, else a skip.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from labtools import procs
from labtools.cluster import Pool, PoolError
from labtools.config import RunConfig


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run {what} as root")
        pytest.skip(f"{what} needs root")


def tiny(tmp_path, cifar_dir) -> RunConfig:
    return RunConfig(limit_train=96, limit_test=50, epochs=1, quiet=True, out=str(tmp_path), cifar_dir=cifar_dir)


# ------------------------------------------------------------------ emulated hosts
@pytest.mark.hosts
@pytest.mark.mpi
@pytest.mark.timeout(420)
def test_pool_on_emulated_hosts(tmp_path, cifar_dir):
    """Controller here, listening on the bridge; one engine in each of 3 host namespaces, started by
    mpiexec through the wrapper; they are ranks 0..2, train, and stop() leaves nothing in any host."""
    _need_root("the pool on emulated hosts (network namespaces)")
    from labtools.emulate import Hosts

    with Hosts(n=3, rate="1gbit") as h:
        hydra = h.mpiexec_args(1)
        profile = {"hosts": h.ips, "ranks_per_node": 1,  # the profile's own hosts: labtools writes -hosts/-ppn
                   "mpi_args": hydra[hydra.index("-launcher"):],  # -launcher ssh -launcher-exec WRAPPER -localhost IP
                   "env": h.env(), "controller_ip": h.bridge_ip, "controller_location": h.bridge_ip,
                   "engine_timeout": 180}
        with Pool(profile=profile) as pool:
            cid = pool.cluster_id
            assert pool.n == 3 and set(pool.ranks) == set(pool.client.ids)
            assert sorted(pool.ranks.values()) == [0, 1, 2]
            assert [pool.hosts[r] for r in range(3)] == h.names  # rank r runs in namespace lt-hr
            assert all(pool.pids[r] in h.pids(r) for r in range(3))
            summary = pool.run(tiny(tmp_path, cifar_dir))
            assert summary["world"] == 3 and summary["processes"] == 3 and summary["epochs"] == 1
            assert [r["world"] for r in pool.last_results] == [3, 3, 3]
        assert not pool.running
        assert [h.pids(i) for i in range(3)] == [[], [], []]
        assert procs.find(cid) == []


# ------------------------------------------------------------------ Slurm
@pytest.fixture(scope="module")
def slurm():
    _need_root("the pool on Slurm (slurmctld, slurmd, munged)")
    from labtools.slurm_local import LocalSlurm, SlurmUnavailable

    try:
        s = LocalSlurm().start()
    except SlurmUnavailable as e:
        pytest.fail(str(e))
    yield s
    s.close()


def _squeue(slurm, *args) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True,
                          env={**os.environ, **slurm.env()}).stdout.strip()


def _gone(slurm, job: str, within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while _squeue(slurm, "-j", job, "-o", "%T") and time.monotonic() < deadline:
        time.sleep(0.5)
    return not _squeue(slurm, "-j", job, "-o", "%T")


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_pool_as_a_slurm_job(slurm, tmp_path, cifar_dir):
    """Pool(n=2, launcher slurm): the engines are one sbatch job (srun), ranks 0 and 1, and train."""
    profile = {"launcher": "slurm", "env": slurm.env(), "slurm": {"time": "10"}, "engine_timeout": 180}
    with Pool(n=2, profile=profile) as pool:
        cid, job = pool.cluster_id, pool.cluster.engine_set.job_id
        assert _squeue(slurm, "-j", job, "-o", "%T %j") == f"RUNNING ipengine-{cid}"
        assert sorted(pool.ranks.values()) == [0, 1]
        summary = pool.run(tiny(tmp_path, cifar_dir))
        assert summary["world"] == 2 and summary["processes"] == 2
    assert procs.find(cid) == [] and _gone(slurm, job)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_engine_job_that_cannot_start_is_a_pool_error(slurm):
    """An impossible partition: sbatch's refusal is the PoolError, at once."""
    t0 = time.monotonic()
    with pytest.raises(PoolError, match="(?i)could not start 2 MPI engines.*invalid partition"):
        Pool(n=2, profile={"launcher": "slurm", "env": slurm.env(), "slurm": {"partition": "nosuch"}}).start()
    assert time.monotonic() - t0 < 30


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_cancelled_engine_job_is_a_pool_error_not_a_hang(slurm):
    """A held engine job cancelled before it starts: start() fails within seconds, not after engine_timeout."""
    profile = {"launcher": "slurm", "env": slurm.env(), "slurm": {"options": ["--hold"]}, "engine_timeout": 600}
    pool, cancelled = Pool(n=2, profile=profile), []

    def cancel():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not cancelled:
            for line in _squeue(slurm, "-o", "%i %j").splitlines():
                job, name = line.split()
                if pool.cluster_id and name == f"ipengine-{pool.cluster_id}":
                    subprocess.run(["scancel", job], env={**os.environ, **slurm.env()}, check=True)
                    cancelled.append(time.monotonic())
            time.sleep(0.5)

    threading.Thread(target=cancel, daemon=True).start()
    with pytest.raises(PoolError, match="could not start 2 MPI engines.*Engine set stopped"):
        pool.start()
    assert cancelled and time.monotonic() - cancelled[0] < 20
    assert not pool.running and procs.find(pool.cluster_id) == []
