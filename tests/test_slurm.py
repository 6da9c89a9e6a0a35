"""examples/slurm/train.sbatch on a real one-node Slurm cluster (labtools/slurm_local.py).

Needs root (slurmctld, slurmd and munged are started here) and Slurm installed
(`apt-get install slurmctld slurmd slurm-client munge`; .ci/run does it). Not root: a skip locally,
a failure in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "examples" / "slurm" / "train.sbatch"
QUICK = ["--limit-train", "480", "--limit-test", "100", "--quiet"]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        msg = ("tests/test_slurm.py starts slurmctld, slurmd and munged (labtools/slurm_local.py) "
               "and must run as root")
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI runs it as root", pytrace=False)
        pytest.skip(msg)
    from labtools.slurm_local import LocalSlurm, SlurmUnavailable

    try:
        s = LocalSlurm().start()
    except SlurmUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    print(f"local Slurm {'reused' if s.reused else f'up in {s.startup_s:.1f} s'}", file=sys.stderr)
    yield s
    s.close()


def _env(slurm, out: Path, **extra) -> dict:
    return {**os.environ, **slurm.env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "LABTOOLS_VENV": sys.prefix, "OUT": str(out), "EXPERIMENT": "slurm", "EPOCHS": "1", **extra}


def _sbatch(slurm, tmp_path: Path, args: list[str], wait: bool = True, timeout: float = 300, **env):
    """Submit the example script: 2 tasks on the one node, 1 core each (this machine has 2)."""
    from labtools.slurm_local import which

    cmd = [which("sbatch"), "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--time=15", f"--output={tmp_path}/job-%j.out", *(["--wait"] if wait else []), str(SCRIPT), *args]
    return subprocess.run(cmd, env=_env(slurm, tmp_path / "results", **env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def _job_id(r: subprocess.CompletedProcess) -> str:
    return r.stdout.strip().split(";")[0].splitlines()[-1]


def _output(tmp_path: Path, job: str) -> str:
    f = tmp_path / f"job-{job}.out"
    return f.read_text(errors="replace") if f.exists() else f"(no {f.name})"


def _state(slurm, job: str) -> str:
    """The job's state; COMPLETING while its processes are being stopped. LocalSlurm's slurmctld
    keeps an ended job for at least MinJobAge (5 s), so ask right after it ends."""
    from labtools.slurm_local import which

    r = subprocess.run([which("squeue"), "-h", "-t", "all", "-j", job, "-o", "%T"], env=_env(slurm, Path(".")),
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip() or f"(squeue: {r.stderr.strip()})"


def _alive(pids) -> list[int]:
    out = []
    for _, pid in pids:
        try:
            os.kill(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            pass
    return out


def _one_run(out: Path) -> Path:
    runs = [m.parent for m in (out / "slurm").glob("*/manifest.json")]
    assert len(runs) == 1, runs
    return runs[0]


def test_the_example_script_trains_on_two_processes_and_records_a_completed_run(slurm, cifar_dir, tmp_path):
    r = _sbatch(slurm, tmp_path, [*QUICK, "--cifar-dir", cifar_dir])
    job = _job_id(r)
    log = _output(tmp_path, job)
    assert r.returncode == 0, (r.stderr, log[-3000:])
    d = _one_run(tmp_path / "results")
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "completed" and m["world"] == 2 and m["processes"] == 2, m
    assert (d / "summary.json").is_file()
    assert _state(slurm, job) == "COMPLETED"
    assert f"job {job}: 2 processes on 1 node(s)" in log


def test_a_failing_job_fails_the_submission_with_the_one_line_error(slurm, cifar_dir, tmp_path):
    r = _sbatch(slurm, tmp_path, [*QUICK, "--cifar-dir", cifar_dir, "--lr", "-1"])
    job = _job_id(r)
    log = _output(tmp_path, job)
    assert r.returncode == 2, (r.returncode, log)  # sbatch --wait: the job's exit status, labtools' usage error
    errors = [line for line in log.splitlines() if line.startswith("labtools: error:")]
    assert errors == ["labtools: error: --lr must be positive; got -1.0."], log[-3000:]
    assert "Traceback" not in log
    assert _state(slurm, job) == "FAILED"
    assert not (tmp_path / "results" / "slurm").exists()  # refused before any run folder


def test_scancel_stops_every_process_and_the_run_is_interrupted(slurm, cifar_dir, tmp_path):
    """scancel: slurmd sends SIGCONT+SIGTERM to every process of the job's steps (proctrack/linuxproc:
    the whole process tree: mpiexec, srun, the Hydra proxy, every keeper and worker), SIGKILL after
    KillWait (30 s). Each worker only sets a flag, stops at its next step, the processes agree that
    all of them were interrupted, and the root marks the run `interrupted`, checkpoint kept: not
    `failed` (that is for a process killed outright, named by its keeper).

    It cancels once the first epoch's checkpoint is written (the run folder's manifest exists from
    before the first step). A SIGTERM before the first step is acted on only after TensorFlow has
    traced that step: measured 21-30 s here under a load average of 11, too close to KillWait; past
    it, SIGKILL would hit keepers and workers alike and the record would stay `running` (`died` to
    readers). Mid-training it stops in ~4 s."""
    from labtools.slurm_local import which

    r = _sbatch(slurm, tmp_path, [*QUICK, "--cifar-dir", cifar_dir], wait=False, EPOCHS="100")
    assert r.returncode == 0, r.stderr
    job = _job_id(r)
    out = tmp_path / "results"
    t0 = time.monotonic()
    while not list((out / "slurm").glob("*/checkpoint.npz")):
        assert time.monotonic() - t0 < 240, ("no checkpoint", _state(slurm, job), _output(tmp_path, job)[-3000:])
        time.sleep(0.2)
    d = _one_run(out)
    pids = json.loads((d / "manifest.json").read_text())["pids"]
    subprocess.run([which("scancel"), job], env=_env(slurm, out), check=True, timeout=10)
    t1 = time.monotonic()
    while _state(slurm, job) in ("RUNNING", "COMPLETING") or _alive(pids):
        assert time.monotonic() - t1 < 60, ("job still running", _state(slurm, job), _alive(pids))
        time.sleep(0.2)
    took = time.monotonic() - t1
    log = _output(tmp_path, job)
    assert _state(slurm, job) == "CANCELLED" and took < 30, (took, log[-3000:])
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "interrupted" and "SIGTERM" in m["error"], (m, log[-3000:])
    assert m["epochs_done"] >= 1 and (d / "checkpoint.npz").is_file()
    said = [line for line in log.splitlines() if line.startswith("labtools:")]
    assert len(said) == 1 and "2 of 2 processes stopped" in said[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    runs = subprocess.run([sys.executable, "-m", "labtools.cli", "runs", "--results", str(out)],
                          capture_output=True, text=True, timeout=60)
    lines = runs.stdout.splitlines()
    i = next((i for i, ln in enumerate(lines) if ln.startswith(d.name)), None)
    # its row, under its experiment's line, says how it ended
    assert i is not None and "slurm:" in lines[:i] and "interrupted" in lines[i].split(), runs.stdout + runs.stderr
