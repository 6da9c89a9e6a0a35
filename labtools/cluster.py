"""labtools.cluster: a pool of ipyparallel engines that are the ranks of one MPI job.

    with Pool(n=2) as pool:                       # mpiexec -n 2 ipengines on this machine
        print(pool.ranks)                         # {engine id: MPI rank}, e.g. {0: 0, 1: 1}
        summary = pool.run(RunConfig(epochs=2))   # labtools.train.run on every engine

The engines are one launch of ipyparallel's MPI engine launcher (or its Slurm one: mpiexec in a batch
job), so ``pool.run(cfg)`` is ``mpiexec -n N labtools train``. ``pool.view``: a DirectView ordered by
rank (``.activate()`` for ``%px``); ``pool.apply(f, *args)``: f on every engine, results by rank.
What the engines print streams live (ipyparallel's ``AsyncResult.stream_output``).

Failures, never a hang: an exception on the engines is one ``PoolError`` naming the failing MPI
rank(s); the pool stays usable. Other ranks still busy ``hang_grace`` s later (in a collective?) or a
task past its ``timeout``: the pool is restarted and PoolError raised. A dead engine raises
``EngineDied`` naming it; the pool is restarted (``restart_on_death=True``) or stopped. Engines that
never start (the job cancelled, mpiexec failed) are a PoolError at once. Ctrl-C in a task stops the
pool. ``stop()`` (also leaving ``with``) stops engines and controller, then kills what is left.

Cluster profile: a dict, or a JSON or TOML file with these keys (the annotations are not JSON):

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
Every node needs this Python environment and CIFAR-10 at the same paths.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import ipyparallel as ipp
from ipyparallel.cluster.launcher import LauncherError, MPIEngineSetLauncher, SlurmEngineSetLauncher
from ipyparallel.error import CompositeError
from traitlets import Unicode
from traitlets.config import Config

from . import procs
from .config import RunConfig

BIN = Path(sys.executable).parent
PROFILE_KEYS = {"launcher", "hosts", "machinefile", "ranks_per_node", "n", "mpiexec", "mpi_args", "env",
                "controller_ip", "controller_location", "engine_timeout", "slurm"}


class PoolError(RuntimeError):
    """A task or the pool failed; ``ranks`` names the MPI ranks concerned, ``errors`` the remote errors."""

    def __init__(self, message: str, ranks=(), errors: dict | None = None):
        super().__init__(message)
        self.ranks, self.errors = sorted(ranks), errors or {}


class EngineDied(PoolError):
    """An engine process died; the pool was stopped (and restarted if asked)."""


def _whoami():  # on an engine, with this module's globals there
    from mpi4py import MPI  # here, not at the top: importing it initialises MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), socket.gethostname(), os.getpid()


def _train(d, resume=None):  # on the engines
    from labtools.train import run

    return run(RunConfig.from_dict(d), resume=resume)


# ------------------------------------------------------------------ profile -> ipyparallel launcher
def load_profile(profile: dict | str | Path) -> dict:
    """A cluster profile (a dict, or a .json / .toml file), checked and normalised."""
    where, prof = "cluster profile", profile
    if not isinstance(profile, dict):
        p = Path(profile).expanduser()
        where += f" {p}"
        try:
            text = p.read_text()
            if p.suffix == ".toml":
                import tomllib  # Python >= 3.11
            prof = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except OSError as e:
            raise PoolError(f"cannot read {where}: {e.strerror}.") from None
        except ValueError as e:
            raise PoolError(f"{where} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}.") from None
    if set(prof) - PROFILE_KEYS:
        raise PoolError(f"{where} has unknown key(s) {', '.join(sorted(set(prof) - PROFILE_KEYS))}; "
                        f"known: {', '.join(sorted(PROFILE_KEYS))}.")
    if prof.get("launcher", "mpi") not in ("mpi", "slurm"):
        raise PoolError(f"{where}: launcher must be mpi or slurm; got {prof['launcher']!r}.")
    prof = dict(prof)
    if isinstance(prof.get("hosts"), str):
        prof["hosts"] = [h for h in re.split(r"[,\s]+", prof["hosts"]) if h]
    if prof.get("machinefile"):
        prof["machinefile"] = str(Path(prof["machinefile"]).expanduser())
    return prof


def _host_args(prof: dict, mpiexec: list[str]) -> list[str]:
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
    raise PoolError(f"cannot tell which MPI {mpiexec[0]} is (not MPICH/Hydra or Open MPI); "
                    f"leave out hosts/machinefile/ranks_per_node and pass them in mpi_args.")


class SlurmEngines(SlurmEngineSetLauncher):
    """ipyparallel's Slurm engine launcher, completed: it tells the engine set's stop callbacks when
    the job ends (also cancelled before it ran), as the MPI launcher does when mpiexec exits; it
    writes ``options`` into the script; Slurm's commands get the profile's env and their complaints
    become the error. The job runs mpiexec, not srun (as examples/slurm does): the MPI then starts its
    ranks in the allocation whatever PMI plugin Slurm has, where srun without one gives n rank 0s."""

    default_template = Unicode("#!/bin/sh\n#SBATCH --export=ALL\n#SBATCH --job-name=ipengine-{cluster_id}\n"
                               "{program_and_args}\n")

    def _slurm(self, *cmd) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.get_env()})

    def _run_command(self, command, **kw):
        r = self._slurm(*command)
        if r.returncode:
            raise LauncherError(f"{shlex.join(command)}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def _insert_job_array_in_script(self):  # options after --ntasks={n}: its check takes --ntasks-per-node for it
        super()._insert_job_array_in_script()
        first, rest = self.batch_template.split("\n", 1)
        self.batch_template = "\n".join([first, self.options, rest] if self.options else [first, rest])

    def write_batch_script(self, n=1):
        self.batch_file = os.path.splitext(self.output_file)[0] + ".sbatch"  # by the job's log, not in the cwd
        super().write_batch_script(n)

    def start(self, n=1):  # on the pool's loop, which self.loop is then: the watcher's callbacks run there
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


def _launcher(prof: dict) -> tuple[type, Config, dict]:
    """The ipyparallel engine launcher class and config, and the Cluster's controller arguments."""
    c, hosts, ppn = Config(), prof.get("hosts"), prof.get("ranks_per_node")
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),  # quieter live output
           **{k: str(v) for k, v in prof.get("env", {}).items()}, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    exe = prof.get("mpiexec") or shutil.which("mpiexec", path=env["PATH"])
    if not exe:
        raise PoolError("mpiexec not found: install the mpich wheel (pip install mpich) or a system MPI, "
                        "or name it in the cluster profile's mpiexec key.")
    cmd = shlex.split(exe) if isinstance(exe, str) else list(exe)
    if prof.get("launcher", "mpi") == "mpi":
        c.MPIEngineSetLauncher.update(mpi_cmd=cmd, mpi_args=_host_args(prof, cmd) + list(prof.get("mpi_args", [])),
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


# ------------------------------------------------------------------ the pool
class Pool:
    """n ipyparallel engines forming one MPI job; a context manager (start on enter, stop on exit).

    ``ranks``: {engine id: MPI rank}; ``hosts``, ``pids``: {rank: host name / process id}; ``view``:
    blocking DirectView on all engines ordered by rank; ``last_results``: the last run's results by rank.
    """

    def __init__(self, n: int | None = None, profile: dict | str | Path | None = None, *,
                 start_timeout: float = 120, hang_grace: float = 30, poll: float = 0.5):
        self.profile = prof = load_profile(profile) if profile else {}
        self.n = int(n or prof.get("n") or len(prof.get("hosts") or []) * (prof.get("ranks_per_node") or 0) or 2)
        self.start_timeout = float(prof.get("engine_timeout", start_timeout))
        self.hang_grace, self.poll = hang_grace, poll
        self.cluster = self.client = self.view = self.cluster_id = self._loop = None
        self.ranks, self.hosts, self.pids, self.last_results = {}, {}, {}, []
        self._ended = threading.Event()  # set by the engine set's stop callback

    def __repr__(self) -> str:
        return f"<Pool n={self.n} {f'running, ranks {self.ranks}' if self.running else 'stopped'}>"

    def __enter__(self) -> "Pool":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    @property
    def running(self) -> bool:
        return self.client is not None

    def _sync(self, coro):
        """Run a Cluster coroutine on the pool's loop thread: a launcher calls its stop callbacks on the
        loop that started it, and ipyparallel's *_sync methods outside Jupyter close theirs at once."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="labtools-pool", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> "Pool":
        """Start the controller and n MPI engines, connect, and map engine ids to MPI ranks."""
        if self.running:
            return self
        cls, config, kw = _launcher(self.profile)
        log = logging.getLogger("labtools.cluster.ipyparallel")
        log.setLevel(logging.ERROR)  # not ipyparallel's per-stop engine log dumps: our errors say what matters
        self.cluster = ipp.Cluster(engine_launcher_class=cls, n=self.n, config=config, log=log,
                                   engine_timeout=int(self.start_timeout), **kw)
        self.cluster_id, self._ended = self.cluster.cluster_id, threading.Event()
        try:  # start_and_connect fails at once if the engine set ends (mpiexec exits, the job is cancelled)
            self.client = self._sync(self.cluster.start_and_connect(n=self.n))
            self.cluster.engine_set.on_stop(lambda data, ended=self._ended: ended.set())  # this start's event
            ids = sorted(self.client.ids)
            info = self.client[ids].apply_async(_whoami).get(timeout=self.start_timeout)
            if sorted(r for r, *_ in info) != list(range(len(ids))) or {s for _, s, *_ in info} != {len(ids)}:
                raise PoolError(f"the {len(ids)} engines are not the ranks of one MPI job "
                                f"(rank, world size per engine: {[(r, s) for r, s, *_ in info]}).")
        except BaseException as e:
            log = self._engine_log()[-2000:]
            self.stop()
            if isinstance(e, PoolError) or not isinstance(e, Exception):
                raise
            raise PoolError(f"could not start {self.n} MPI engines: {type(e).__name__}: {e}"
                            + (f"\nengine log (tail):\n{log}" if log.strip() else "")) from None
        self.ranks = {eid: r for eid, (r, *_) in zip(ids, info)}
        self.hosts, self.pids = {r: h for r, _, h, _ in info}, {r: pid for r, _, _, pid in info}
        self.view = self.client[sorted(ids, key=self.ranks.get)]
        self.view.block = True  # as Cluster.start_and_connect(activate=True): %%px waits and shows output
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop engines and controller, then kill whatever of this pool's cluster is left.
        kill=True first sends the engines SIGKILL: busy ones ignore a polite stop for seconds."""
        cluster, client = self.cluster, self.client
        self.cluster = self.client = self.view = None
        self.ranks, self.hosts, self.pids = {}, {}, {}
        try:
            if client is not None:
                client.close(linger=0)
            if kill and cluster is not None:  # through mpiexec (its proxies kill the ranks) or scancel
                with suppress(Exception):  # an engine set that has ended has nothing to kill
                    self._sync(cluster.signal_engines(signal.SIGKILL))
            # engines first, not stop_cluster's both at once: engines without a controller take seconds to exit
            for step in (cluster.stop_engines, cluster.stop_controller) if cluster is not None else ():
                try:
                    self._sync(step())
                except Exception as e:
                    print(f"labtools.cluster: stopping the cluster: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            procs.kill(self.processes())

    def restart(self, kill: bool = False) -> "Pool":
        self.stop(kill)
        return self.start()

    def processes(self) -> list:
        """Live processes of this pool's cluster on this host (controller, mpiexec, proxies, engines)."""
        return procs.find(self.cluster_id, parts=None) if self.cluster_id else []

    # -------------------------------------------------------------- tasks
    def run(self, cfg: RunConfig | dict, *, resume=None, timeout: float | None = None, restart_on_death: bool = True,
            stream: bool = True) -> dict:
        """labtools.train.run(cfg) on every engine; return the root's summary (all ranks: last_results).
        resume: a stopped run's folder to continue from its checkpoint (cfg is then its recorded one)."""
        d = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
        RunConfig.from_dict(d).validate()  # a user error is one sentence here, before any engine works
        self.last_results = self.apply(_train, d, None if resume is None else str(resume), timeout=timeout,
                                       restart_on_death=restart_on_death, stream=stream, name="training")
        return self.last_results[0]

    def apply(self, fn, *args, timeout: float | None = None, restart_on_death: bool = True,
              stream: bool = True, name: str | None = None) -> list:
        """fn(*args) on every engine; the results as a list ordered by MPI rank."""
        name = name or getattr(fn, "__name__", "task")
        if not self.running:
            raise PoolError("the pool is not running; call pool.start() (or use `with Pool(...) as pool:`).")
        if self._dead():
            self._engine_died(restart_on_death, [])
        ar, tb_limit = self.view.apply_async(fn, *args), CompositeError.tb_limit
        parts, ended = ar.split(), []  # ended: ranks in the order their parts ended; a dead engine's nanny
        for r, part in enumerate(parts):  # tells the controller at once, before MPI has ended the others
            part.add_done_callback(lambda f, r=r: ended.append(r))
        CompositeError.tb_limit = 1  # streamed: the first remote traceback in full, later ones one line each
        try:
            with ar.stream_output() if stream else nullcontext():
                outcome, failed = self._watch(ar, parts, timeout)
                ar.wait_for_output(1)
        except KeyboardInterrupt:
            print("Interrupted: stopping the pool (its engines may be waiting in an MPI collective); "
                  "pool.start() gives a fresh one.", file=sys.stderr)
            self.stop(kill=True)
            raise
        finally:
            CompositeError.tb_limit = tb_limit
        if not stream:
            ar.display_outputs()
        died = [r for r in ended if getattr(parts[r].exception(), "ename", "") == "EngineError"]
        if outcome == "died" or died:
            self._engine_died(restart_on_death, died)
        if outcome in ("hang", "timeout"):
            errs = "; ".join(dict.fromkeys(_describe(e) for e in failed.values()))
            why = (f"{name} did not finish within {timeout:g}s" if outcome == "timeout" else
                   f"{name} failed on MPI rank(s) {', '.join(map(str, sorted(failed)))} ({errs}) and the "
                   f"other ranks were still busy {self.hang_grace:g}s later (waiting in an MPI collective?)")
            raise PoolError(f"{why}; {self._reset(restart_on_death)}", failed, failed)
        results = ar.get(timeout=30, return_exceptions=True)
        errors = {r: x for r, x in enumerate(results) if isinstance(x, BaseException)}
        if errors:
            raise _failure(name, errors)
        return results

    def _watch(self, ar, parts, timeout):
        """Wait for ar; return (outcome, {rank: error}) with outcome done | died | hang | timeout."""
        t0, first_err = time.monotonic(), None
        while not ar.wait(self.poll):
            if self._dead():
                return "died", {}
            failed = {r: p.exception() for r, p in enumerate(parts) if p.done() and not p.successful()}
            first_err = first_err or (time.monotonic() if failed else None)
            if first_err is not None and time.monotonic() - first_err > self.hang_grace:
                return "hang", failed
            if timeout is not None and time.monotonic() - t0 > timeout:
                return "timeout", failed
        return "done", {}

    # -------------------------------------------------------------- engine death
    def _dead(self) -> bool:
        """The engine set ended (its stop callback fired), or an engine left the controller (its nanny said so)."""
        return self._ended.is_set() or bool(set(self.ranks) - set(self.client.ids))

    def _engine_log(self) -> str:
        """What mpiexec (or the Slurm job) and the engines wrote; the launcher keeps it once they ended."""
        es = self.cluster.engine_set if self.cluster else None
        return (es.get_output(remove=False) or "") if es else ""

    def _engine_died(self, restart: bool, died: list):
        """Name the dead engine, stop (and maybe restart) the pool, raise EngineDied. One death makes MPI end
        the others within milliseconds; died: the ranks whose task part ended in EngineError, first to die
        first. Without a task, Open MPI's report names the first (MPICH's names the lowest rank)."""
        self._ended.wait(2 if died else 10)  # the launcher's report (how it died) comes with the job's end
        log = self._engine_log()
        ranks = died[:1] or {int(r) for r in re.findall(r"process rank (\d+) with PID", log)} or \
            {r for e, r in self.ranks.items() if e not in self.client.ids}
        engine_of = {r: e for e, r in self.ranks.items()}
        who = ", ".join(f"engine {engine_of[r]} (MPI rank {r}, pid {self.pids[r]} on {self.hosts[r]})"
                        for r in sorted(ranks)) or "an engine (which one is unknown)"
        how = next((f" ({m.group(1).strip()})" for pat in (r"EXIT STRING: (.+)", r"exited on signal (\d+ \(\w+\))",
                                                           r"EXIT CODE: (\d+)") if (m := re.search(pat, log))), "")
        others = f"; MPI then ended the other {len(died) - 1} engine(s)" if len(died) > 1 else ""
        raise EngineDied(f"{who} died{' first' if others else ''}{how}{others}; the task's work is lost; "
                         f"{self._reset(restart)}", ranks)

    def _reset(self, restart: bool) -> str:
        if restart:
            self.restart(kill=True)
            return f"the pool was restarted with {self.n} fresh engines - run it again."
        self.stop(kill=True)
        return "the pool was stopped - pool.start() starts a fresh one."


def _describe(e: BaseException) -> str:
    return f"{e.ename}: {e.evalue}" if hasattr(e, "ename") else f"{type(e).__name__}: {e}"


def _failure(name: str, errors: dict) -> PoolError:
    """One PoolError from the per-rank remote errors; RankFailure messages name the failing process."""
    msgs = {r: _describe(e) for r, e in errors.items()}
    origin = {int(p) for r, e in errors.items() if getattr(e, "ename", "") == "RankFailure"
              for p in re.findall(r"process (\d+):", msgs[r])}
    distinct = list(dict.fromkeys(msgs.values()))
    detail = distinct[0] if len(distinct) == 1 else "; ".join(f"rank {r}: {m}" for r, m in msgs.items())
    ranks = sorted(origin or errors)
    return PoolError(f"{name} failed on MPI rank(s) {', '.join(map(str, ranks))}: {detail}", ranks, errors)


__all__ = ["Pool", "PoolError", "EngineDied", "load_profile"]
