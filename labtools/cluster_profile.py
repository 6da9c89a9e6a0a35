"""labtools.cluster_profile: a cluster profile -> ipyparallel's engine launcher and its settings.

A profile is a dict or a JSON file (the annotations below are not JSON):

    {"launcher": "mpi",                   "mpi" (mpiexec from here, default) or "slurm" (sbatch)
     "hosts": ["pi1", "pi2"],             or "machinefile": "~/machines"
     "ranks_per_node": 2,                 MPI processes per host
     "n": 4,                              engines in all (default: hosts x ranks_per_node, else 2)
     "mpiexec": "/usr/bin/mpiexec",       default: the venv's mpiexec, else the one on PATH
     "mpi_args": ["-bind-to", "core"],    extra mpiexec arguments, verbatim
     "env": {"OMP_NUM_THREADS": "2"},     extra environment for the engines (and Slurm's commands)
     "controller_ip": "*",                where the controller listens (default with hosts: "*")
     "controller_location": "head",       how engines reach it (default with hosts: this host's name)
     "engine_timeout": 180,               seconds to wait for all engines to register
     "slurm": {"partition": "compute", "account": "lab", "qos": "", "time": "01:00:00",
               "options": ["--mem-per-cpu=2G"]}}        extra #SBATCH lines

hosts, machinefile and ranks_per_node become ``-hosts/-f/-ppn`` (MPICH Hydra, Intel MPI),
``--host/--hostfile/--map-by ppr:N:node`` (Open MPI) or ``--nodelist/--ntasks-per-node`` (Slurm).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

from ipyparallel.cluster.launcher import LauncherError, MPIEngineSetLauncher, SlurmEngineSetLauncher
from traitlets import Unicode
from traitlets.config import Config

BIN = Path(sys.executable).parent
KEYS = {"launcher", "hosts", "machinefile", "ranks_per_node", "n", "mpiexec", "mpi_args", "env",
        "controller_ip", "controller_location", "engine_timeout", "slurm"}


class ProfileError(ValueError):
    """The profile cannot be read or used; the message says why in one sentence."""


def load_profile(profile: dict | str | Path) -> dict:
    """A cluster profile (a dict or a JSON file), checked and normalised."""
    where, prof = "cluster profile", profile
    if not isinstance(profile, dict):
        where += f" {profile}"
        try:
            prof = json.loads(Path(profile).expanduser().read_text())
        except OSError as e:
            raise ProfileError(f"cannot read {where}: {e.strerror}.") from None
        except ValueError as e:
            raise ProfileError(f"{where} is not valid JSON: {e}.") from None
    if unknown := set(prof) - KEYS:
        raise ProfileError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}.")
    if prof.get("launcher", "mpi") not in ("mpi", "slurm"):
        raise ProfileError(f"{where}: launcher must be mpi or slurm; got {prof['launcher']!r}.")
    prof = dict(prof)
    if isinstance(prof.get("hosts"), str):
        prof["hosts"] = [h for h in re.split(r"[,\s]+", prof["hosts"]) if h]
    if prof.get("machinefile"):
        prof["machinefile"] = str(Path(prof["machinefile"]).expanduser())
    return prof


def host_args(prof: dict, mpiexec: list[str]) -> list[str]:
    """mpiexec arguments for hosts / machinefile / ranks_per_node, in this MPI's dialect."""
    hosts, mf, ppn = prof.get("hosts"), prof.get("machinefile"), prof.get("ranks_per_node")
    if not (hosts or mf or ppn):
        return []
    try:
        version = subprocess.run(mpiexec + ["--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        args = ["--host", ",".join(f"{h}:{ppn}" if ppn else h for h in hosts)] if hosts else []
        return args + (["--hostfile", mf] if mf else []) + (["--map-by", f"ppr:{ppn}:node"] if ppn else [])
    if "HYDRA" in version or "Intel" in version:
        return (["-hosts", ",".join(hosts)] if hosts else []) + (["-f", mf] if mf else []) + \
               (["-ppn", str(ppn)] if ppn else [])
    raise ProfileError(f"cannot tell which MPI {mpiexec[0]} is (not MPICH/Hydra or Open MPI); "
                       "leave out hosts/machinefile/ranks_per_node and pass them in mpi_args.")


class SlurmEngines(SlurmEngineSetLauncher):
    """ipyparallel's Slurm engine launcher, completed: it tells the stop callbacks when the job ends
    (also cancelled before it ran), writes ``options`` into the script, and gives Slurm's commands the
    profile's env, their complaint becoming the error. The job runs mpiexec, not srun (as
    examples/slurm does): srun without Slurm's PMI plugin starts n rank 0s."""

    default_template = Unicode("#!/bin/sh\n#SBATCH --export=ALL\n#SBATCH --job-name=ipengine-{cluster_id}\n"
                               "{program_and_args}\n")

    def _slurm(self, *cmd) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.get_env()})

    def _run_command(self, command, **kw):
        if (r := self._slurm(*command)).returncode:
            raise LauncherError(f"{shlex.join(command)}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def _insert_job_array_in_script(self):  # options after --ntasks: its check takes --ntasks-per-node for it
        super()._insert_job_array_in_script()
        first, rest = self.batch_template.split("\n", 1)
        self.batch_template = "\n".join([first, self.options, rest] if self.options else [first, rest])

    def write_batch_script(self, n=1):
        self.batch_file = os.path.splitext(self.output_file)[0] + ".sbatch"  # by the job's log, not in the cwd
        super().write_batch_script(n)

    def start(self, n=1):  # on the pool's loop (self.loop): the watcher's callback runs there
        threading.Thread(target=self._watch_job, args=(super().start(n), self.loop), daemon=True).start()

    def stop(self):
        with suppress(OSError):  # sbatch took a copy
            os.remove(self.batch_file)
        if self.state == "running":  # an ended job has nothing to cancel
            super().stop()

    def _watch_job(self, job, loop):  # squeue lists a job until it has ended
        while self.state == "running":
            time.sleep(2)
            r = self._slurm("squeue", "-h", "-j", job, "-o", "%T")
            if r.stdout.strip() in ("", "COMPLETING") and (r.returncode == 0 or "Invalid job id" in r.stderr):
                return loop.add_callback(self.notify_stop, {"job_id": job, "state": "ended"})


def launcher(prof: dict) -> tuple[type, Config, dict]:
    """The ipyparallel engine launcher class and config, and the Cluster's controller arguments."""
    c, hosts, ppn = Config(), prof.get("hosts"), prof.get("ranks_per_node")
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),  # quieter live output
           **{k: str(v) for k, v in prof.get("env", {}).items()}, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    exe = prof.get("mpiexec") or shutil.which("mpiexec", path=env["PATH"])
    if not exe:
        raise ProfileError("mpiexec not found: install the mpich wheel (pip install mpich) or a system MPI, "
                           "or name it in the cluster profile's mpiexec key.")
    cmd = shlex.split(exe) if isinstance(exe, str) else list(exe)
    if prof.get("launcher", "mpi") == "mpi":
        c.MPIEngineSetLauncher.update(mpi_cmd=cmd, mpi_args=host_args(prof, cmd) + list(prof.get("mpi_args", [])),
                                      environment=env)
        cls, remote = MPIEngineSetLauncher, bool(hosts or prof.get("machinefile"))
    else:
        s = prof.get("slurm", {})
        opts = ([f"--ntasks-per-node={ppn}"] if ppn else []) + ([f"--nodelist={','.join(hosts)}"] if hosts else [])
        c.SlurmEngineSetLauncher.update(
            queue=s.get("partition", ""), account=s.get("account", ""), qos=s.get("qos", ""),
            timelimit=s.get("time", ""), options="\n".join(f"#SBATCH {o}" for o in opts + s.get("options", [])),
            engine_cmd=[*cmd, *prof.get("mpi_args", []), sys.executable, "-m", "ipyparallel.engine"],
            engine_args=["--mpi"], environment=env)
        cls, remote = SlurmEngines, True
    kw = {k: prof[k] for k in ("controller_ip", "controller_location") if k in prof}
    if remote:  # engines elsewhere reach the controller by this host's name, on any interface
        kw = {"controller_ip": "*", "controller_location": socket.gethostname(), **kw}
    return cls, c, kw
