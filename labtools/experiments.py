"""Sweeps over run configurations that reuse what the results store already holds.

``ensure(plan, runner)`` runs only the planned runs whose science (config hash with np resolved, and
numerics that today's code reproduces) has no completed record yet, so a rerun of a notebook adds
runs instead of repeating them, and an interrupted sweep resumes.
Tables are always recomputed from the raw records afterwards.

Runners turn (config, P) into a finished run:
- PoolRunner: an ipyparallel MPI engine pool of P engines (labtools.cluster), restarted when P changes;
- MpiexecRunner: ``mpiexec -n P python -m labtools.cli train ...`` in a subprocess, output streamed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from .config import RunConfig
from . import results


@dataclass
class Planned:
    """One run a study needs. ``timed``: its wall time is used, so a record whose wall time is a
    cluster's (records.CLUSTER) is preferred; any record of the same science still stands for it (its
    time is drawn as "not a cluster time") unless the study is asked to retime. Untimed: any P computes
    the same numbers (tested) and any record of the same science does."""
    cfg: RunConfig
    processes: int
    timed: bool = False


# A results root holding this file is read-only for the studies (the committed records): notebooks
# and `labtools reproduce` render it and never train into it unless told to (write_store).
READ_ONLY_MARK = "READ_ONLY"


def read_only(root) -> str | None:
    """Why a results root is read-only (the marker's first line), or None when it is writable."""
    mark = Path(root) / READ_ONLY_MARK
    if not mark.is_file():
        return None
    return (mark.read_text(errors="replace").strip().splitlines() or ["marked read-only"])[0]


class Store:
    """Index of a results root: science key -> completed runs that today's code would reproduce.

    Reuse ignores the experiment folder and the process count: two records with the same science
    key computed the same thing (N logical ranks on any P give the same numbers; a test says so).
    Records whose numerics are stale (records.migrate) are never reused.
    """

    def __init__(self, root):
        from .record import COMPLETED, RUNNING, status

        self.root = Path(root)
        self.by_key: dict[str, list[tuple[Path, dict]]] = {}
        self.stale: dict[str, list[Path]] = {}
        self.stopped: dict[str, list[Path]] = {}  # failed, interrupted or died, with a checkpoint: resumable
        for d in results.run_dirs(self.root, completed=False):
            st = status(d)
            if st != COMPLETED:
                if st != RUNNING and (d / "checkpoint.npz").is_file():
                    m, _ = results.read_record(d)
                    if m["numerics_current"]:
                        self.stopped.setdefault(m["science_key"], []).append(d)
                continue
            m, _ = results.read_record(d)
            (self.by_key if m["numerics_current"] else self.stale).setdefault(m["science_key"], []).append(
                (d, m) if m["numerics_current"] else d)

    def find(self, p: Planned, retime: bool = False) -> Path | None:
        """The record that stands for a planned run, the newest of its science. For a timed plan, a
        cluster-timed one if there is one, else any (its numbers count; its time says what it is);
        with retime=True only a cluster-timed record does, so a study asked to retime runs again."""
        cands = self.by_key.get(p.cfg.science_key(), [])
        if p.timed:
            timed = [(d, m) for d, m in cands if m["cluster_wall_time"]]
            cands = timed if (timed or retime) else cands
        if not cands:
            return None
        return max(cands, key=lambda dm: (dm[1].get("end_utc") or "", dm[0].name))[0]

    def stale_for(self, p: Planned) -> list[Path]:
        return self.stale.get(p.cfg.science_key(), [])

    def resumable(self, p: Planned) -> Path | None:
        """A stopped run of this science to continue instead of starting again (untimed plans only:
        a resumed run's wall time is never a cluster time)."""
        found = self.stopped.get(p.cfg.science_key(), [])
        return None if p.timed or not found else max(found, key=lambda d: d.name)


def _root(plan: list[Planned]) -> Path:
    roots = {p.cfg.out for p in plan}
    if len(roots) != 1:
        raise ValueError(f"a plan must write to one results root; got {sorted(roots)}")
    return Path(roots.pop())


def todo(plan: list[Planned], store: "Store", rerun: bool = False, retime: bool = False) -> list[Planned]:
    """The planned runs the store cannot stand for: what a study would train."""
    return [p for p in plan if rerun or store.find(p, retime=retime) is None]


def with_data(plan: list[Planned]) -> list[Planned]:
    """The plan with the CIFAR-10 folder found once, here, before any engine starts: every run is
    given that folder, and missing data is one sentence (data.DataError) instead of a traceback
    from every rank."""
    from dataclasses import replace

    from .data import find_cifar_dir

    if not plan:
        return plan
    found = str(find_cifar_dir(plan[0].cfg.cifar_dir, download=True))
    return [replace(p, cfg=p.cfg.replace(cifar_dir=found)) for p in plan]


def ensure(plan: list[Planned], runner, desc: str = "runs", rerun: bool = False, retime: bool = False) -> list[Path]:
    """Make sure every planned run has a record; return one run folder per planned run."""
    from tqdm.auto import tqdm

    if not plan:
        return []
    root = _root(plan)
    store = Store(root)
    todo_ = todo(plan, store, rerun, retime)
    if todo_ and read_only(root):
        raise ValueError(f"the results store {root} is read-only ({read_only(root)}); {len(todo_)} planned runs are "
                         "missing from it: render it without training (run_missing=False) or train into another store")
    todo_ = with_data(todo_)
    n_stale = sum(bool(store.stale_for(p)) and not store.by_key.get(p.cfg.science_key()) for p in todo_)
    print(f"{desc}: {len(plan)} planned, {len(plan) - len(todo_)} already in the results store, {len(todo_)} to run"
          + (f" ({n_stale} of them have only stale records, made by code that computed differently)" if n_stale else ""),
          flush=True)
    with tqdm(total=len(todo_), desc=desc, unit="run") as bar:
        for p in todo_:
            bar.set_postfix_str(f"np={p.cfg.np} P={p.processes} seed={p.cfg.seed}")
            resume = None if rerun else store.resumable(p)
            if resume:
                print(f"{desc}: continuing the stopped run {resume.name} from its checkpoint", flush=True)
                s = runner(p.cfg, p.processes, resume=resume)
            else:
                s = runner(p.cfg, p.processes)
            bar.update(1)
            ev = s.get("eval_set", "test")
            bar.set_postfix_str(f"np={p.cfg.np}: {ev} acc {100 * s[f'{ev}_acc']:.1f}%, {s['global_wall_s']:.0f}s")
    return stored(plan, desc=None, store=None if todo_ else store)[0]


def stored(plan: list[Planned], desc: str | None = "runs", store: Store | None = None) -> tuple[list[Path], int]:
    """The record for each planned run the store holds, and how many planned runs have none."""
    if not plan:
        return [], 0
    store = store or Store(_root(plan))
    found = [store.find(p) for p in plan]
    missing = sum(d is None for d in found)
    if desc:
        print(f"{desc}: {len(plan)} planned, {len(plan) - missing} in the results store, {missing} missing "
              "(not run: run_missing=False)", flush=True)
    return [d for d in found if d is not None], missing


def cli_args(cfg: RunConfig) -> list[str]:
    """The `labtools train` flags that reproduce cfg."""
    args = []
    for f in fields(RunConfig):
        v = getattr(cfg, f.name)
        if v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


class MpiexecRunner:
    """Run each config as its own `mpiexec -n P` job; engine-free, for terminals and CI."""

    def __init__(self, extra_mpi_args: list[str] | None = None, timeout: float | None = None):
        self.extra = extra_mpi_args or []
        self.timeout = timeout

    def __call__(self, cfg: RunConfig, processes: int, resume: Path | None = None) -> dict:
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = ["mpiexec", "-n", str(processes), *self.extra, sys.executable, "-m", "labtools.cli", "train",
               *(["--resume", str(resume)] + (["--quiet"] if cfg.quiet else []) if resume else cli_args(cfg))]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        tail = []
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if line.startswith(("[Root]", "labtools:")) or (not cfg.quiet and line.startswith("[Rank")):
                print(line, end="", flush=True)
        rc = proc.wait(timeout=self.timeout)
        if rc != 0:
            raise RuntimeError(f"`{' '.join(cmd[:4])} ... train` exited {rc} after {time.time() - t0:.0f}s:\n"
                               + "".join(tail[-15:]))
        newest = Store(cfg.out).find(Planned(cfg, processes))
        if newest is None:
            raise RuntimeError(f"`{' '.join(cmd[:4])} ... train` exited 0 but left no completed record in {cfg.out}")
        return {**json.loads((newest / "summary.json").read_text()), "run_dir": str(newest)}


class PoolRunner:
    """Run configs on an ipyparallel MPI engine pool (labtools.cluster.Pool), one pool size at a time."""

    def __init__(self, profile=None, **pool_kw):
        self.profile, self.pool_kw, self.pool = profile, pool_kw, None

    def __call__(self, cfg: RunConfig, processes: int, resume: Path | None = None) -> dict:
        from .cluster import Pool

        if self.pool is None or self.pool.n != processes:
            self.close()
            self.pool = Pool(n=processes, profile=self.profile, **self.pool_kw)
            self.pool.start()
        if resume:
            from .record import RunRecord

            recorded = RunRecord.open(resume).manifest["config"]
            cfg = RunConfig.from_dict({**recorded, "cifar_dir": cfg.cifar_dir, "out": cfg.out, "quiet": cfg.quiet,
                                       "experiment": Path(resume).parent.name, "run_id": Path(resume).name})
        return self.pool.run(cfg, resume=resume)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
