"""labtools.cluster: a pool of ipyparallel engines that are the ranks of one MPI job.

    with Pool(n=2) as pool:                       # mpiexec -n 2 ipengines on this machine
        print(pool.ranks)                         # {engine id: MPI rank}, e.g. {0: 0, 1: 1}
        summary = pool.run(RunConfig(epochs=2))   # labtools.train.run on every engine

The engines are one launch of ipyparallel's MPI engine launcher (or its Slurm one: mpiexec in a batch
job; see labtools.cluster_profile for the profile), so ``pool.run(cfg)`` is ``mpiexec -n N labtools
train``. ``pool.view``: a DirectView ordered by rank (``.activate()`` for ``%px``); ``pool.apply(f,
*args)``: f on every engine, results by rank. What the engines print streams live.

Failures, never a hang: an exception on the engines is one ``PoolError`` naming the failing MPI
rank(s); the pool stays usable. Other ranks still busy ``hang_grace`` s later (in a collective?) or a
task past its ``timeout``: the pool is restarted and PoolError raised. A dead engine raises
``EngineDied`` naming it; the pool is restarted (``restart_on_death=True``) or stopped. Engines that
never start (the job cancelled, mpiexec failed) are a PoolError at once. Ctrl-C in a task stops the
pool. ``stop()`` (also leaving ``with``) stops engines and controller, then kills what is left.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import ipyparallel as ipp
from ipyparallel.error import CompositeError

from . import procs
from .cluster_profile import ProfileError, launcher, load_profile
from .config import RunConfig


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
    from labtools import train

    def report(done, total, row):  # to the client's progress bar (Pool.run), through IOPub
        from ipyparallel.datapub import publish_data

        ev = "val" if "val_acc" in row else "test"
        publish_data({"epoch": done, "epochs": total, "acc": row[f"{ev}_acc"], "eval_set": ev})

    train.on_epoch = report
    try:
        return train.run(RunConfig.from_dict(d), resume=resume)
    finally:
        train.on_epoch = None


class _EpochBar:
    """A tqdm.auto bar (a widget in JupyterLab) over a run's epochs, fed by the root engine's reports."""

    def __init__(self, epochs: int, show: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=epochs, desc="training", unit="epoch", disable=not show)

    def poll(self, parts) -> None:
        with suppress(Exception):  # a progress display never fails a task
            data = parts[0].data if parts else {}
            if data.get("epoch", 0) > self.bar.n:
                self.bar.update(data["epoch"] - self.bar.n)
                self.bar.set_postfix_str(f"{data['eval_set']} acc {100 * data['acc']:.1f}%")

    def close(self) -> None:
        self.bar.close()


# Pools this process started and has not stopped: a new Pool reuses or replaces them (a notebook cell
# run twice leaves no orphan engines), and they are stopped when the process exits (a kernel shutdown).
_RUNNING: list = []


@atexit.register
def _stop_all() -> None:
    for pool in list(_RUNNING):
        with suppress(Exception):
            pool.stop(kill=True)


_px = {"stub": False}  # %px points at a stopped pool: the next pool started takes the magics over


def _px_stopped(line, cell=None):
    from IPython.core.error import UsageError

    raise UsageError("%px has no engines: the pool was stopped; pool.start() starts fresh ones (and %px follows them).")


# ------------------------------------------------------------------ the pool
class Pool:
    """n ipyparallel engines forming one MPI job; a context manager (start on enter, stop on exit).

    ``ranks``: {engine id: MPI rank}; ``hosts``, ``pids``: {rank: host name / process id}; ``view``:
    blocking DirectView on all engines ordered by rank; ``last_results``: the last run's results by rank.
    """

    def __init__(self, n: int | None = None, profile: dict | str | Path | None = None, *,
                 start_timeout: float = 120, hang_grace: float = 30, poll: float = 0.5):
        try:  # a bad profile or no mpiexec: one sentence now, not at start()
            self.profile = prof = load_profile(profile) if profile else {}
            self._launcher = launcher(prof)
        except ProfileError as e:
            raise PoolError(str(e)) from None
        self.n = int(n or prof.get("n") or len(prof.get("hosts") or []) * (prof.get("ranks_per_node") or 0) or 2)
        self.start_timeout = float(prof.get("engine_timeout", start_timeout))
        self.hang_grace, self.poll = hang_grace, poll
        self.cluster = self.client = self.view = self.cluster_id = self._loop = None
        self.ranks, self.hosts, self.pids, self.last_results = {}, {}, {}, []
        self._ended = threading.Event()  # set by the engine set's stop callback
        self._key = (self.n, json.dumps(self.profile, sort_keys=True, default=str))
        self._activated = False  # %px magics point at this pool (activate())

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
        """Start the controller and n MPI engines, connect, and map engine ids to MPI ranks.

        One pool per process: a running pool of the same size and profile (a cell run twice) is taken
        over instead of starting another; any other running pool is stopped first."""
        if self.running:
            return self
        for other in [p for p in _RUNNING if p is not self]:
            if other.running and other._key == self._key and not other._dead():
                self._take_over(other)
                print(f"labtools: reusing the running pool of {self.n} engines (ranks {sorted(self.ranks.values())}); "
                      "pool.restart() gives fresh ones.", file=sys.stderr)
                return self
            print(f"labtools: stopping the earlier pool of {other.n} engines (one pool per process).", file=sys.stderr)
            other.stop()
        cls, config, kw = self._launcher
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
        _RUNNING.append(self)
        if self._activated or _px["stub"]:
            self.activate()
        return self

    def activate(self) -> "Pool":
        """Point %px / %%px at this pool's engines; after a stop they say so, after a start they follow."""
        if not self.running:
            raise PoolError("the pool is not running; call pool.start() first.")
        self.view.activate()
        self._activated, _px["stub"] = True, False
        return self

    def _take_over(self, other: "Pool") -> None:
        for k in ("cluster", "client", "view", "cluster_id", "_loop", "ranks", "hosts", "pids", "_ended", "_activated"):
            setattr(self, k, getattr(other, k))
        other.cluster = other.client = other.view = other.cluster_id = other._loop = None
        other.ranks, other.hosts, other.pids = {}, {}, {}
        _RUNNING.remove(other)
        _RUNNING.append(self)

    def stop(self, kill: bool = False) -> None:
        """Stop engines and controller, then kill whatever of this pool's cluster is left.
        kill=True first sends the engines SIGKILL: busy ones ignore a polite stop for seconds."""
        cluster, client = self.cluster, self.client
        self.cluster = self.client = self.view = None
        self.ranks, self.hosts, self.pids = {}, {}, {}
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self._activated:  # %px would otherwise raise ipyparallel's "Client cannot be used after ... closed"
            with suppress(Exception):
                from IPython import get_ipython

                for name in ("px", "autopx", "pxresult"):
                    get_ipython().register_magic_function(_px_stopped, "line_cell", name)
                _px["stub"] = True
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
            stream: bool = True, progress: bool = True) -> dict:
        """labtools.train.run(cfg) on every engine; return the root's summary (all ranks: last_results).
        resume: a stopped run's folder to continue from its checkpoint (cfg is then its recorded one).
        progress: a bar over the epochs with the latest accuracy (a widget in JupyterLab)."""
        d = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
        RunConfig.from_dict(d).validate()  # a user error is one sentence here, before any engine works
        if not self.running:
            raise PoolError("the pool is not running; call pool.start() (or use `with Pool(...) as pool:`).")
        bar = _EpochBar(d.get("epochs", 10), progress)
        try:
            self.last_results = self.apply(_train, d, None if resume is None else str(resume), timeout=timeout,
                                           restart_on_death=restart_on_death, stream=stream, name="training",
                                           on_poll=bar.poll)
        finally:
            bar.close()
        return self.last_results[0]

    def apply(self, fn, *args, timeout: float | None = None, restart_on_death: bool = True,
              stream: bool = True, name: str | None = None, on_poll=None) -> list:
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
                outcome, failed = self._watch(ar, parts, timeout, on_poll)
                ar.wait_for_output(1)
                if on_poll is not None:  # the last report, which a short task gives between two polls
                    on_poll(parts)
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

    def _watch(self, ar, parts, timeout, on_poll=None):
        """Wait for ar; return (outcome, {rank: error}) with outcome done | died | hang | timeout."""
        t0, first_err = time.monotonic(), None
        while not ar.wait(self.poll):
            if on_poll is not None:
                on_poll(parts)
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
        """Name the engine that died first, stop (and maybe restart) the pool, raise EngineDied. One death
        makes MPI end the others within milliseconds, so neither the order the nannies' reports reach the
        controller in (died: ranks whose task part ended in EngineError) nor MPI's exit report (Hydra
        names the lowest rank it reaped) says who was first; the nannies' own clocks do (_first_gone)."""
        self._ended.wait(10)  # the launcher has the engines' log once the engine set has ended
        log = self._engine_log()
        ranks, sure = self._first_gone(log), True
        if not ranks:
            ranks, sure = set(died[:1]) or {r for e, r in self.ranks.items() if e not in self.client.ids}, False
        engine_of = {r: e for e, r in self.ranks.items()}
        who = ", ".join(f"engine {engine_of[r]} (MPI rank {r}, pid {self.pids[r]} on {self.hosts[r]})"
                        for r in sorted(ranks)) or "an engine (which one is unknown)"
        how = next((f" ({m.group(1).strip()})" for pat in (r"EXIT STRING: (.+)", r"exited on signal (\d+ \(\w+\))")
                    if (m := re.search(pat, log))), "")
        first = " first" if sure else " (the first reported gone)"
        raise EngineDied(f"{who} died{first}{how}; the task's work is lost; {self._reset(restart)}", ranks)

    def _first_gone(self, log: str) -> set:
        """The rank(s) whose engine exited first: each engine's nanny logs, to the millisecond, when its
        engine's pipe closed; MPI ends the others 5-15 ms after the first death (hosts' clocks must agree,
        as NTP keeps them)."""
        seen = {}
        for t, e in re.findall(r"^(\S+ [\d:.]+) \[KernelNanny\.(\d+)\] (?:Pipe closed|Parent \d+ exited)", log, re.M):
            seen.setdefault(int(e), t)
        first = min(seen.values(), default=None)
        return {self.ranks[e] for e, t in seen.items() if t == first and e in self.ranks}

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
