"""labtools.cluster.Pool: engines map to MPI ranks, failures become one clear error, nothing is left behind."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest

from labtools import procs
from labtools.cluster import EngineDied, Pool, PoolError
from labtools.cluster_profile import BIN, ProfileError, SlurmEngines, host_args, launcher, load_profile
from labtools.config import RunConfig

pytestmark = pytest.mark.mpi


def leftovers(cluster_id: str, descendants: bool = True) -> list[str]:
    """Live ipengine/ipcontroller/mpiexec processes carrying the cluster id (or below this test process)."""
    def cmd(p):
        try:
            return " ".join(p.cmdline())[:100]
        except psutil.Error:
            return "(gone)"

    return sorted(f"{p.pid}: {cmd(p)}" for p in procs.find(cluster_id, under=os.getpid() if descendants else None))


def notebook_fn(f):
    """Ship f by value, as if defined in a notebook: the engines cannot import this test module."""
    f.__module__ = "__main__"
    return f


@notebook_fn
def _rank():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


@notebook_fn
def _fail_on_rank_1():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        raise ValueError("boom on purpose")
    return "ok"


@notebook_fn
def _fail_on_rank_1_while_rank_0_waits():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        raise ValueError("rank 1 fails alone")
    MPI.COMM_WORLD.Barrier()  # rank 0 would wait here forever


@notebook_fn
def _sleep(s):
    import time

    time.sleep(s)


def tiny(tmp_path, cifar_dir, **kw) -> RunConfig:
    return RunConfig(np=2, epochs=1, limit_train=96, limit_test=50, out=str(tmp_path), experiment="t",
                     diagnostics=False, cifar_dir=cifar_dir, **kw)


@pytest.mark.timeout(180)
def test_engines_map_to_ranks_and_stop_leaves_nothing():
    pool = Pool(n=2)
    with pool:
        cid = pool.cluster_id
        assert sorted(pool.ranks.values()) == [0, 1]
        assert set(pool.ranks) == set(pool.client.ids)
        assert pool.apply(_rank) == [0, 1]  # the view is ordered by rank
        assert leftovers(cid)  # the check sees a running pool
    assert not pool.running
    assert leftovers(cid) == []


@pytest.mark.timeout(180)
def test_exception_on_an_engine_is_one_error_and_pool_stops_clean():
    with pytest.raises(PoolError, match=r"failed on MPI rank\(s\) 1: ValueError: boom on purpose") as ei:
        with Pool(n=2) as pool:
            cid = pool.cluster_id
            with pytest.raises(PoolError):
                pool.apply(_fail_on_rank_1)
            assert pool.apply(_rank) == [0, 1]  # still usable after a task failed
            pool.apply(_fail_on_rank_1)  # this one leaves the with block
    assert ei.value.ranks == [1]
    assert not pool.running and leftovers(cid) == []


@pytest.mark.timeout(240)
def test_run_trains_and_streams_rank_lines(tmp_path, cifar_dir, capsys):
    with Pool(n=2) as pool:
        cid = pool.cluster_id
        summary = pool.run(tiny(tmp_path, cifar_dir))
    assert summary["world"] == 2 and summary["processes"] == 2 and summary["epochs"] == 1
    assert Path(summary["run_dir"], "summary.json").is_file()
    assert [r["world"] for r in pool.last_results] == [2, 2]
    out = capsys.readouterr().out
    assert "[Rank 0] Epoch 1/1" in out and "[Rank 1] Epoch 1/1" in out and "[Root] Test acc" in out
    assert leftovers(cid) == []


@pytest.mark.timeout(240)
def test_run_with_injected_failure_raises_and_pool_stops_clean(tmp_path, cifar_dir):
    with Pool(n=2) as pool:
        cid = pool.cluster_id
        with pytest.raises(PoolError, match="injected failure on rank 1") as ei:
            pool.run(tiny(tmp_path, cifar_dir, inject_failure="1:0"))
        assert ei.value.ranks == [1] and "RankFailure" in str(ei.value)
    assert leftovers(cid) == []


@pytest.mark.timeout(180)
def test_failure_on_one_rank_while_others_wait_does_not_hang():
    with Pool(n=2, hang_grace=2) as pool:
        old = pool.cluster_id
        with pytest.raises(PoolError, match=r"rank\(s\) 1 \(ValueError: rank 1 fails alone\).*restarted") as ei:
            pool.apply(_fail_on_rank_1_while_rank_0_waits)
        assert ei.value.ranks == [1] and leftovers(old, descendants=False) == []
        assert pool.apply(_rank) == [0, 1]
        new = pool.cluster_id
    assert leftovers(new) == []


@pytest.mark.timeout(240)
def test_dead_engine_is_named_and_pool_restarted():
    with Pool(n=2) as pool:
        old = pool.cluster_id
        threading.Timer(3, os.kill, (pool.pids[1], signal.SIGKILL)).start()
        with pytest.raises(EngineDied, match=r"engine \d+ \(MPI rank 1, .*restarted") as ei:
            pool.apply(_sleep, 120)
        assert ei.value.ranks == [1]
        assert leftovers(old, descendants=False) == []  # the new pool is running below us
        assert pool.running and pool.cluster_id != old and pool.apply(_rank) == [0, 1]
        new = pool.cluster_id
    assert leftovers(new) == []


def test_profile_file(tmp_path):
    p = tmp_path / "pis.json"
    p.write_text(json.dumps({"hosts": "pi1,pi2", "ranks_per_node": 2, "mpi_args": ["-v"]}))
    prof = load_profile(p)
    assert prof["hosts"] == ["pi1", "pi2"] and Pool(profile=p).n == 4
    assert host_args(prof, [str(BIN / "mpiexec")]) == ["-hosts", "pi1,pi2", "-ppn", "2"]  # MPICH wheel
    p.write_text(json.dumps({"host": "pi1"}))
    with pytest.raises(ProfileError, match="unknown key.*host"):
        load_profile(p)
    with pytest.raises(PoolError, match=r"pis.json has unknown key\(s\) host;"):  # one sentence, at construction
        Pool(profile=p)
    p.write_text("{not json")
    with pytest.raises(PoolError, match="is not valid JSON"):
        Pool(profile=p)


def test_slurm_profile_becomes_the_slurm_launchers_settings(tmp_path):
    """A profile's slurm keys are ipyparallel's Slurm launcher settings; its batch script has them all."""
    prof = load_profile({"launcher": "slurm", "hosts": "n1,n2", "ranks_per_node": 2, "mpi_args": ["-bind-to", "core"],
                         "slurm": {"partition": "compute", "account": "lab", "time": "01:00:00",
                                   "options": ["--mem-per-cpu=2G"]}})
    cls, config, kw = launcher(prof)
    assert cls is SlurmEngines and kw["controller_ip"] == "*" and Pool(profile=prof).n == 4
    es = cls(config=config, profile_dir=str(tmp_path), cluster_id="abc")
    es.write_batch_script(4)
    lines = Path(es.batch_file).read_text().splitlines()
    for want in ("--job-name=ipengine-abc", "--ntasks=4", "--partition=compute", "--account=lab", "--time=01:00:00",
                 "--ntasks-per-node=2", "--nodelist=n1,n2", "--mem-per-cpu=2G"):
        assert f"#SBATCH {want}" in lines, lines
    assert lines[-1] == f"{BIN / 'mpiexec'} -bind-to core {sys.executable} -m ipyparallel.engine --mpi", lines
    assert Path(es.batch_file).parent == tmp_path / "log"  # next to the job's output, not in the cwd


# ------------------------------------------------------------------ notebook cells run twice
@pytest.mark.timeout(240)
def test_a_second_pool_reuses_the_running_one_and_another_size_replaces_it(capsys):
    first = Pool(n=2).start()
    cid = first.cluster_id
    try:
        second = Pool(n=2).start()  # the Pool cell run again
        assert second.cluster_id == cid and not first.running and second.apply(_rank) == [0, 1]
        assert "reusing the running pool of 2 engines" in capsys.readouterr().err
        first.stop()  # the old name no longer owns the engines: stopping it must not touch them
        assert second.apply(_rank) == [0, 1]
        third = Pool(n=3).start()
        assert not second.running and leftovers(cid, descendants=False) == []  # replaced: nothing left of it
        assert "stopping the earlier pool of 2 engines" in capsys.readouterr().err
        assert third.apply(_rank) == [0, 1, 2]
    finally:
        for p in (first, locals().get("second"), locals().get("third")):
            if p is not None:
                p.stop()
    assert leftovers(third.cluster_id) == []


@pytest.mark.timeout(240)
def test_px_after_stop_is_one_sentence_and_process_exit_leaves_no_engines(tmp_path):
    """A kernel's life in a subprocess: %%px on the pool, stop, %%px again, a new pool, exit without stop."""
    import subprocess

    script = tmp_path / "kernel.py"
    script.write_text(
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "from labtools.cluster import Pool\n"
        "ip = InteractiveShell.instance()\n"
        "pool = Pool(n=2).start(); pool.activate()\n"
        "ip.run_cell('%%px\\nfrom mpi4py import MPI\\nprint(\"rank\", MPI.COMM_WORLD.Get_rank())')\n"
        "pool.stop()\n"
        "r = ip.run_cell('%%px\\nprint(1)')\n"
        "print('ERROR_IN_EXEC', type(r.error_in_exec).__name__)\n"
        "pool = Pool(n=2).start()\n"
        "print('CLUSTER', pool.cluster_id, flush=True)\n"
        "ip.run_cell('%%px\\nprint(\"again\")')\n")  # activated before: %%px follows the new engines
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=200, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "rank 0" in out and "rank 1" in out and "again" in out
    assert "ERROR_IN_EXEC UsageError" in out
    assert "%px has no engines: the pool was stopped" in out and "Client cannot be used" not in out
    cid = out.split("CLUSTER ")[1].split()[0]
    assert leftovers(cid, descendants=False) == []  # the process exited without stop(): atexit stopped them
