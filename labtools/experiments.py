"""Sweeps over run configurations that reuse what the results store already holds.

``ensure(plan, runner)`` runs only the (config, P) pairs that have no completed run yet, so a
rerun of a notebook adds runs instead of repeating them, and an interrupted sweep resumes.
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
    cfg: RunConfig
    processes: int


def completed_runs(cfg: RunConfig, processes: int) -> list[Path]:
    """Completed runs in cfg's experiment folder computed with the same science and the same P."""
    out = []
    for d in results.run_dirs(cfg.out, cfg.experiment):
        m = results.read_json(d / "manifest.json")
        if m.get("science_key") == cfg.science_key() and m.get("processes") == processes:
            out.append(d)
    return out


def ensure(plan: list[Planned], runner, desc: str = "runs", rerun: bool = False) -> list[Path]:
    """Make sure every planned run exists; return all matching run folders (old and new)."""
    from tqdm.auto import tqdm

    todo = [p for p in plan if rerun or not completed_runs(p.cfg, p.processes)]
    print(f"{desc}: {len(plan)} planned, {len(plan) - len(todo)} already in the results store, {len(todo)} to run",
          flush=True)
    with tqdm(total=len(todo), desc=desc, unit="run") as bar:
        for p in todo:
            bar.set_postfix_str(f"np={p.cfg.np} P={p.processes} seed={p.cfg.seed}")
            s = runner(p.cfg, p.processes)
            bar.update(1)
            bar.set_postfix_str(f"np={p.cfg.np}: test acc {100 * s['test_acc']:.1f}%, {s['global_wall_s']:.0f}s")
    dirs = []
    for p in plan:
        dirs.extend(completed_runs(p.cfg, p.processes))
    return sorted(set(dirs))


def stored(plan: list[Planned], desc: str = "runs") -> tuple[list[Path], int]:
    """The completed runs the store holds for a plan, and how many planned runs have none."""
    dirs, missing = [], 0
    for p in plan:
        found = completed_runs(p.cfg, p.processes)
        missing += not found
        dirs.extend(found)
    print(f"{desc}: {len(plan)} planned, {len(plan) - missing} in the results store, {missing} missing "
          "(not run: run_missing=False)", flush=True)
    return sorted(set(dirs)), missing


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

    def __call__(self, cfg: RunConfig, processes: int) -> dict:
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = ["mpiexec", "-n", str(processes), *self.extra, sys.executable, "-m", "labtools.cli", "train",
               *cli_args(cfg)]
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
        runs = completed_runs(cfg, processes)
        newest = max(runs, key=lambda d: (d / "summary.json").stat().st_mtime)
        return {**json.loads((newest / "summary.json").read_text()), "run_dir": str(newest)}


class PoolRunner:
    """Run configs on an ipyparallel MPI engine pool (labtools.cluster.Pool), one pool size at a time."""

    def __init__(self, profile=None, **pool_kw):
        self.profile, self.pool_kw, self.pool = profile, pool_kw, None

    def __call__(self, cfg: RunConfig, processes: int) -> dict:
        from .cluster import Pool

        if self.pool is None or self.pool.n != processes:
            self.close()
            self.pool = Pool(n=processes, profile=self.profile, **self.pool_kw)
            self.pool.start()
        return self.pool.run(cfg)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
