"""labtools.cluster: a pool of ipyparallel engines that are the ranks of one MPI job.

    from labtools.cluster import Pool
    from labtools.config import RunConfig

    with Pool(n=2) as pool:                       # mpiexec -n 2 ipengines on this machine
        print(pool.ranks)                         # {engine id: MPI rank}, e.g. {0: 0, 1: 1}
        summary = pool.run(RunConfig(epochs=2))   # labtools.train.run on every engine

Each engine is one MPI process of a single ``mpiexec`` launch, so ``labtools.train.run`` on the
engines is exactly ``mpiexec -n N labtools train``. ``pool.view`` is a DirectView ordered by MPI
rank (``pool.view.activate()`` gives the ``%px`` magics); ``pool.apply(f, *args)`` runs any
function on every engine and returns the results ordered by rank.

Live output: while a task runs, ipyparallel's ``AsyncResult.stream_output()`` forwards what the
engines print as it arrives: in a Jupyter kernel as one output area per engine that grows
line by line, in a terminal as ``[stdout:ENGINE]`` blocks.

Failures, never a hang:
- an exception on the engines (train.run raises RankFailure on every process) becomes one
  ``PoolError`` naming the failing MPI rank(s); the pool stays usable;
- if some ranks failed and the others are still busy ``hang_grace`` seconds later (waiting in an
  MPI collective), or a task passes its ``timeout``, the pool is restarted and ``PoolError`` raised;
- a dead engine (process gone) raises ``EngineDied`` naming the engine and rank; the MPI job is
  broken then, so the pool is stopped and, with ``restart_on_death=True`` (default), restarted;
- Ctrl-C while a task runs stops the pool (the engines may sit in a collective); ``start()`` again.
``stop()`` (and leaving the ``with`` block, also on an exception) stops the controller and the
engines and then kills any process left with this pool's cluster id.

Cluster profile (JSON, or TOML with the same keys), for engines on other machines:

    {
      "launcher": "mpi",                  "mpi" (default: mpiexec from here) or "slurm" (sbatch + srun)
      "hosts": ["pi1", "pi2", "pi3", "pi4"],   or "machinefile": "~/machines"
      "ranks_per_node": 2,                MPI processes per host
      "n": 8,                             engines in all (default: hosts x ranks_per_node, else 2)
      "mpiexec": "/usr/bin/mpiexec",      default: the venv's mpiexec, else the one on PATH
      "mpi_args": ["-bind-to", "core"],   extra mpiexec (or srun) arguments, verbatim
      "env": {"OMP_NUM_THREADS": "2"},    extra environment for the engines
      "controller_ip": "*",               where the controller listens (default "*" if remote)
      "controller_location": "head",      how engines reach it (default: this host's name)
      "engine_timeout": 180,              seconds to wait for all engines to register
      "slurm": {"partition": "compute", "account": "lab", "qos": "", "time": "01:00:00",
                "options": ["--mem-per-cpu=2G"]}        extra #SBATCH lines
    }

(the annotations are not JSON; a real file has only the keys and values). Hosts, machinefile
and ranks_per_node become ``-hosts/-f/-ppn`` for MPICH-style mpiexec (Hydra, also Intel MPI)
or ``--host/--hostfile/--map-by ppr:N:node`` for Open MPI. Every node needs the same Python
environment at the same path (the engines run ``sys.executable``) and CIFAR-10 at the same path.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import psutil

from .config import RunConfig

BIN = Path(sys.executable).parent
PROFILE_KEYS = {"launcher", "hosts", "machinefile", "ranks_per_node", "n", "mpiexec", "mpi_args", "env",
                "controller_ip", "controller_location", "engine_timeout", "slurm"}


class PoolError(RuntimeError):
    """A task or the pool failed; ``ranks`` names the MPI ranks concerned, ``errors`` the remote errors."""

    def __init__(self, message: str, ranks=(), errors: dict | None = None):
        super().__init__(message)
        self.ranks = sorted(ranks)
        self.errors = errors or {}


class EngineDied(PoolError):
    """An engine process died; the pool was stopped (and restarted if asked)."""


# ------------------------------------------------------------------ run on the engines
def _whoami():
    import os
    import socket

    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), socket.gethostname(), os.getpid()


def _train(d, resume=None):
    from labtools.config import RunConfig
    from labtools.train import run

    return run(RunConfig.from_dict(d), resume=resume)


# ------------------------------------------------------------------ profile
def load_profile(path: str | Path) -> dict:
    """Read a cluster profile (.json or .toml) and check its keys."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise PoolError(f"cannot read cluster profile {p}: {e.strerror}.") from None
    try:
        if p.suffix == ".toml":
            import tomllib  # Python >= 3.11

            prof = tomllib.loads(text)
        else:
            prof = json.loads(text)
    except ValueError as e:
        raise PoolError(f"cluster profile {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}.") from None
    unknown = sorted(set(prof) - PROFILE_KEYS)
    if unknown:
        raise PoolError(f"cluster profile {p} has unknown key(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(PROFILE_KEYS))}.")
    if isinstance(prof.get("hosts"), str):
        prof["hosts"] = [h for h in re.split(r"[,\s]+", prof["hosts"]) if h]
    if prof.get("machinefile"):
        prof["machinefile"] = str(Path(prof["machinefile"]).expanduser())
    if prof.get("launcher", "mpi") not in ("mpi", "slurm"):
        raise PoolError(f"cluster profile {p}: launcher must be mpi or slurm; got {prof['launcher']!r}.")
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


def _slurm_template(prof: dict) -> str:
    s = prof.get("slurm", {})
    lines = ["#!/bin/sh", "#SBATCH --export=ALL", "#SBATCH --job-name=ipengine-{cluster_id}",
             "#SBATCH --ntasks={n}", "#SBATCH --output={output_file}"]
    if prof.get("ranks_per_node"):
        lines.append(f"#SBATCH --ntasks-per-node={prof['ranks_per_node']}")
    if prof.get("hosts"):
        lines.append("#SBATCH --nodelist=" + ",".join(prof["hosts"]))
    lines += [f"#SBATCH --{k}={s[k]}" for k in ("partition", "account", "qos", "time") if s.get(k)]
    lines += [f"#SBATCH {o}" for o in s.get("options", [])]
    lines.append(" ".join(["srun", *map(shlex.quote, prof.get("mpi_args", [])), "{program_and_args}"]))
    return "\n".join(lines) + "\n"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ------------------------------------------------------------------ the pool
class Pool:
    """n ipyparallel engines forming one MPI job; a context manager (start on enter, stop on exit).

    ``ranks``: {engine id: MPI rank}; ``hosts``, ``pids``: {rank: host name / process id};
    ``view``: blocking DirectView on all engines ordered by rank; ``last_results``: the last run's
    per-rank results ordered by rank.
    """

    def __init__(self, n: int | None = None, profile: str | Path | None = None, *,
                 start_timeout: float = 120, hang_grace: float = 30, poll: float = 0.5):
        self.profile = load_profile(profile) if profile else {}
        prof = self.profile
        hosts_n = len(prof.get("hosts") or []) * (prof.get("ranks_per_node") or 0)
        self.n = int(n or prof.get("n") or hosts_n or 2)
        self.start_timeout = float(prof.get("engine_timeout", start_timeout))
        self.hang_grace, self.poll = hang_grace, poll
        self.cluster = self.client = self.view = None
        self.cluster_id: str | None = None
        self.ranks: dict[int, int] = {}
        self.hosts: dict[int, str] = {}
        self.pids: dict[int, int] = {}
        self.last_results: list = []
        self._died_at: dict[int, float] = {}
        self._watching = threading.Event()

    def __repr__(self) -> str:
        state = f"running, ranks {self.ranks}" if self.running else "stopped"
        return f"<Pool n={self.n} {state}>"

    def __enter__(self) -> "Pool":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    @property
    def running(self) -> bool:
        return self.client is not None

    # -------------------------------------------------------------- start / stop
    def _cluster(self):
        import ipyparallel as ipp
        from traitlets.config import Config

        prof, c = self.profile, Config()
        env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),  # quieter live output
               **{k: str(v) for k, v in prof.get("env", {}).items()},
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        launcher = prof.get("launcher", "mpi")
        if launcher == "mpi":
            exe = prof.get("mpiexec") or shutil.which("mpiexec", path=env["PATH"])
            if not exe:
                raise PoolError("mpiexec not found: install the mpich wheel (pip install mpich) or a system MPI, "
                                "or name it in the cluster profile's mpiexec key.")
            cmd = shlex.split(exe) if isinstance(exe, str) else list(exe)
            c.MPIEngineSetLauncher.mpi_cmd = cmd
            c.MPIEngineSetLauncher.mpi_args = _host_args(prof, cmd) + list(prof.get("mpi_args", []))
            c.MPIEngineSetLauncher.environment = env
        else:
            c.SlurmEngineSetLauncher.batch_template = _slurm_template(prof)
            c.SlurmEngineSetLauncher.engine_args = ["--mpi"]
            c.SlurmEngineSetLauncher.environment = env
        kw = {}
        if prof.get("hosts") or prof.get("machinefile") or launcher == "slurm":
            kw = {"controller_ip": prof.get("controller_ip", "*"),
                  "controller_location": prof.get("controller_location", socket.gethostname())}
        log = logging.getLogger("labtools.cluster.ipyparallel")
        log.setLevel(logging.ERROR)  # not ipyparallel's per-stop engine log dumps: our errors say what matters
        return ipp.Cluster(engines=launcher, n=self.n, config=c, engine_timeout=int(self.start_timeout),
                           log=log, **kw)

    def start(self) -> "Pool":
        """Start the controller and n MPI engines, connect, and map engine ids to MPI ranks."""
        if self.running:
            return self
        self.cluster = self._cluster()
        self.cluster_id = self.cluster.cluster_id
        try:
            self.client = self.cluster.start_and_connect_sync(n=self.n)
            ids = sorted(self.client.ids)
            info = self.client[ids].apply_async(_whoami).get(timeout=self.start_timeout)
        except Exception as e:
            log = self._engine_log()[-2000:]
            self.stop()
            raise PoolError(f"could not start {self.n} MPI engines: {type(e).__name__}: {e}"
                            + (f"\nengine log (tail):\n{log}" if log.strip() else "")) from None
        except BaseException:
            self.stop()
            raise
        if sorted(r for r, *_ in info) != list(range(len(ids))) or {s for _, s, *_ in info} != {len(ids)}:
            self.stop()
            raise PoolError(f"the {len(ids)} engines are not the ranks of one MPI job "
                            f"(rank, world size per engine: {[(r, s) for r, s, *_ in info]}).")
        self.ranks = {eid: r for eid, (r, *_) in zip(ids, info)}
        self.hosts = {r: h for r, _, h, _ in info}
        self.pids = {r: pid for r, _, _, pid in info}
        self.view = self.client[sorted(ids, key=self.ranks.get)]
        self.view.block = True  # as Cluster.start_and_connect(activate=True): %%px waits and shows output
        self._watch_deaths()
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop engines and controller, then kill whatever of this pool's cluster is left.

        kill=True first kills the engines on this host: for busy or stuck engines, which ignore a
        polite stop for seconds.
        """
        for p in self.processes() if kill else ():
            if p.pid in self.pids.values():
                try:
                    p.kill()
                except psutil.Error:
                    pass
        cluster, client = self.cluster, self.client
        self.cluster = self.client = self.view = None
        self.ranks, self.hosts, self.pids, self._died_at = {}, {}, {}, {}
        self._watching.set()  # ends the death-watch thread
        try:
            if client is not None:
                try:
                    client.close(linger=0)
                except Exception:
                    pass
            # engines first: engines that lose their controller take seconds to exit
            for step in (cluster.stop_engines_sync, cluster.stop_controller_sync) if cluster else ():
                try:
                    step()
                except Exception as e:
                    print(f"labtools.cluster: stopping the cluster: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            left = self.processes()
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=5)

    def restart(self, kill: bool = False) -> "Pool":
        self.stop(kill)
        return self.start()

    def processes(self) -> list[psutil.Process]:
        """Live processes of this pool's cluster (controller, mpiexec, proxies, engines, nannies)."""
        if not self.cluster_id:
            return []
        found = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get("IPP_CLUSTER_ID") == self.cluster_id or self.cluster_id in " ".join(p.cmdline()):
                    if _alive(p):
                        found.append(p)
            except psutil.Error:
                pass
        return found

    # -------------------------------------------------------------- running tasks
    def run(self, cfg: RunConfig | dict, *, resume=None, timeout: float | None = None, restart_on_death: bool = True,
            stream: bool = True) -> dict:
        """labtools.train.run(cfg) on every engine; return the root's summary (all ranks: last_results).
        resume: a stopped run's folder to continue from its checkpoint (cfg is then its recorded one)."""
        d = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
        RunConfig.from_dict(d).validate()  # a user error is one sentence here, before any engine works
        resume = None if resume is None else str(resume)
        self.last_results = self.apply(_train, d, resume, timeout=timeout, restart_on_death=restart_on_death,
                                       stream=stream, name="training")
        return self.last_results[0]

    def apply(self, fn, *args, timeout: float | None = None, restart_on_death: bool = True,
              stream: bool = True, name: str | None = None) -> list:
        """fn(*args) on every engine; the results as a list ordered by MPI rank."""
        name = name or getattr(fn, "__name__", "task")
        if not self.running:
            raise PoolError("the pool is not running; call pool.start() (or use `with Pool(...) as pool:`).")
        if set(self.ranks) - set(self.client.ids):
            self._engine_died(restart_on_death)
        ar = self.view.apply_async(fn, *args)
        try:
            with _streaming(ar) if stream else nullcontext():
                outcome, failed = self._watch(ar, timeout)
                ar.wait_for_output(1)
        except KeyboardInterrupt:
            print("Interrupted: stopping the pool (its engines may be waiting in an MPI collective); "
                  "pool.start() gives a fresh one.", file=sys.stderr)
            self.stop(kill=True)
            raise
        if not stream:
            ar.display_outputs()
        if outcome == "died":
            self._engine_died(restart_on_death)
        if outcome in ("hang", "timeout"):
            ranks = sorted(failed)
            errs = {r: _describe(e) for r, e in failed.items()}
            why = (f"{name} did not finish within {timeout:g}s" if outcome == "timeout" else
                   f"{name} failed on MPI rank(s) {', '.join(map(str, ranks))} "
                   f"({'; '.join(dict.fromkeys(errs.values()))}) and the other ranks were still busy "
                   f"{self.hang_grace:g}s later (waiting in an MPI collective?)")
            raise PoolError(f"{why}; {self._reset(restart_on_death)}", ranks, failed)
        results = ar.get(timeout=30, return_exceptions=True)
        errors = {r: x for r, x in enumerate(results) if isinstance(x, BaseException)}
        if any(getattr(x, "ename", "") == "EngineError" for x in errors.values()):
            self._engine_died(restart_on_death)
        if errors:
            raise _failure(name, errors)
        return results

    def _watch(self, ar, timeout):
        """Wait for ar; return (outcome, {rank: error}) with outcome done | died | hang | timeout."""
        t0, first_err = time.monotonic(), None
        parts = ar.split()
        while not ar.wait(self.poll):
            if self._dead():
                return "died", {}
            failed = {r: p.exception() for r, p in enumerate(parts) if p.done() and not p.successful()}
            if failed and first_err is None:
                first_err = time.monotonic()
            if first_err is not None and time.monotonic() - first_err > self.hang_grace:
                return "hang", failed
            if timeout is not None and time.monotonic() - t0 > timeout:
                return "timeout", failed
        return "done", {}

    # -------------------------------------------------------------- engine death
    def _watch_deaths(self) -> None:
        """Note when each engine on this host exits (Linux pidfd), to tell who died first: MPI ends
        the whole job when one process dies, and neither mpiexec's report nor the order in which
        engines unregister says reliably which one it was."""
        here, fds = socket.gethostname(), {}
        for r, pid in self.pids.items():
            if self.hosts[r] == here and hasattr(os, "pidfd_open"):
                try:
                    fds[os.pidfd_open(pid)] = r
                except OSError:
                    pass
        stop, died_at = threading.Event(), self._died_at
        self._watching = stop

        def watch():
            try:
                while fds and not stop.is_set():
                    for fd in select.select(list(fds), [], [], 1.0)[0]:
                        died_at[fds.pop(fd)] = time.monotonic()
                        os.close(fd)
            finally:
                for fd in fds:
                    os.close(fd)

        if fds:
            threading.Thread(target=watch, name="labtools-pool-deaths", daemon=True).start()

    def _dead(self) -> bool:
        if set(self.ranks) - set(self.client.ids):
            return True
        proc = getattr(self.cluster.engine_set, "process", None)  # mpiexec, for the mpi launcher
        if proc is not None and not _alive(proc):
            return True
        here = socket.gethostname()
        return any(self.hosts[r] == here and not psutil.pid_exists(pid) for r, pid in self.pids.items())

    def _engine_log(self) -> str:
        """What mpiexec and the engines wrote (ipyparallel deletes the file once it noticed the exit)."""
        es = self.cluster.engine_set if self.cluster else None
        try:
            return Path(es.output_file).read_text(errors="replace")
        except (OSError, AttributeError, TypeError):
            try:
                return es.get_output() or ""
            except Exception:
                return ""

    def _engine_died(self, restart: bool):
        """Name the dead engine, stop (and maybe restart) the pool, raise EngineDied."""
        proc = getattr(self.cluster.engine_set, "process", None)
        deadline = time.monotonic() + 10  # let mpiexec end the job and write its report
        while proc is not None and _alive(proc) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.2)  # and the death watch note the last exits
        log, died_at = self._engine_log(), dict(self._died_at)
        rank_of = {pid: r for r, pid in self.pids.items()}
        if died_at:  # exact, for engines on this host
            ranks = {min(died_at, key=died_at.get)}
        else:  # what mpiexec reports (Open MPI: the first to fail; MPICH: one that ended badly)
            ranks = {int(r) for r in re.findall(r"process rank (\d+) with PID", log)} or \
                    {rank_of[int(p)] for p in re.findall(r"PID (\d+) RUNNING AT", log)[:1] if int(p) in rank_of}
        ids = set(self.client.ids)
        ranks = ranks or {r for e, r in self.ranks.items() if e not in ids}
        engine_of = {r: e for e, r in self.ranks.items()}
        who = ", ".join(f"engine {engine_of[r]} (MPI rank {r}, pid {self.pids[r]} on {self.hosts[r]})"
                        for r in sorted(ranks)) or "an engine (which one is unknown)"
        how = ""
        for pattern in (r"EXIT STRING: (.+)", r"exited on signal (\d+ \(\w+\))", r"EXIT CODE: (\d+)"):
            m = re.search(pattern, log)
            if m:
                how = f" ({m.group(1).strip()})"
                break
        others = f"; MPI then ended the other {len(died_at) - 1} engine(s)" if len(died_at) > 1 else ""
        raise EngineDied(f"{who} died{' first' if others else ''}{how}{others}; the task's work is lost; "
                         f"{self._reset(restart)}", ranks)

    def _reset(self, restart: bool) -> str:
        if restart:
            self.restart(kill=True)
            return f"the pool was restarted with {self.n} fresh engines - run it again."
        self.stop(kill=True)
        return "the pool was stopped - pool.start() starts a fresh one."


@contextmanager
def _streaming(ar):
    """ar.stream_output(), with the first remote traceback in full and later ones as one line each."""
    from ipyparallel import error

    limit, error.CompositeError.tb_limit = error.CompositeError.tb_limit, 1
    try:
        with ar.stream_output():
            yield
    finally:
        error.CompositeError.tb_limit = limit


def _describe(e: BaseException) -> str:
    return f"{e.ename}: {e.evalue}" if hasattr(e, "ename") else f"{type(e).__name__}: {e}"


def _failure(name: str, errors: dict) -> PoolError:
    """One PoolError from the per-rank remote errors; RankFailure messages name the failing process."""
    msgs = {r: _describe(e) for r, e in errors.items()}
    origin = {int(p) for r, e in errors.items() if getattr(e, "ename", "") == "RankFailure"
              for p in re.findall(r"process (\d+):", msgs[r])}
    ranks = sorted(origin or errors)
    distinct = list(dict.fromkeys(msgs.values()))
    detail = distinct[0] if len(distinct) == 1 else "; ".join(f"rank {r}: {m}" for r, m in msgs.items())
    return PoolError(f"{name} failed on MPI rank(s) {', '.join(map(str, ranks))}: {detail}", ranks, errors)


__all__ = ["Pool", "PoolError", "EngineDied", "load_profile"]
