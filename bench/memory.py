"""Benchmark: memory per rank (RSS, PSS, USS) and engine memory over repeated runs in one process.

(a) `mpiexec -n 2 labtools train --np 2 --epochs 1 --limit-train 2400 --threads 1` (or --epochs 10
    --limit-train 50000: the paper's np = 2 protocol, about 5 minutes): peak RSS, PSS and
    USS per rank as the run's records carry them (ranks/rank_NNN.csv, sampled inside the training
    process while it trains), and the same three peaks sampled from outside over each training
    process's whole life (import, data loading and setup included; every 0.2 s with psutil).
    RSS counts every shared page (TensorFlow's libraries, mapped once per host) in full in every
    process; PSS divides each shared page among the processes that map it, so the ranks' PSS add up
    to what the job really holds; USS is what exiting the process would free.
(b) In ONE Python process (what a notebook engine is): `labtools.train.run` 5 times in a row with a
    tiny config (np = 1, P = 1), RSS/PSS/USS after each run. Growth is run 5 against run 2 (run 1 pays
    the one-time costs: TensorFlow's start, first tracing, allocator pools).

Writes bench/results/memory.json (with provenance: git commit, versions, host, date).

    .venv/bin/python bench/memory.py [--limit-train 2400] [--epochs 1] [--runs 5] [--skip-mpi] [--skip-engine] [--json F]
    .venv/bin/python bench/memory.py --epochs 10 --limit-train 50000 --skip-engine --json bench/results/memory_np2_10epochs.json
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from labtools import provenance, results  # noqa: E402
from labtools.keeper import ENV_WORKER  # noqa: E402

BIN = Path(sys.executable).parent
MB = 2 ** 20


def _mem(p: psutil.Process) -> dict:
    """RSS, PSS and USS of one process in MB (PSS/USS None where the OS does not give them)."""
    try:
        m = p.memory_full_info()
    except (psutil.AccessDenied, AttributeError):
        m = p.memory_info()
    return {"rss_mb": m.rss / MB, "pss_mb": getattr(m, "pss", None) and m.pss / MB,
            "uss_mb": getattr(m, "uss", None) and m.uss / MB}


class TreeSampler:
    """Peak RSS/PSS/USS of every training process under a launcher (mpiexec -> keeper -> worker)."""

    def __init__(self, root: psutil.Process, interval: float = 0.2):
        self.root, self.interval = root, interval
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _trainers(self):
        try:
            kids = self.root.children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for k in kids:  # the keeper's child does the work: labtools.keeper.ENV_WORKER=1 in its environment
            try:
                if k.environ().get(ENV_WORKER) == "1":
                    out.append(k)
            except psutil.Error:
                continue
        return out

    def _loop(self):
        while not self._stop.wait(self.interval):
            for p in self._trainers():
                try:
                    m = _mem(p)
                except psutil.Error:
                    continue
                peak = self.peaks.setdefault(p.pid, {k: 0.0 for k in m})
                for k, v in m.items():
                    if v is not None:
                        peak[k] = max(peak[k] or 0.0, v)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def mpi_run(limit_train: int, epochs: int, out: Path, timeout: float = 3600) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = ["train", "--np", "2", "--epochs", str(epochs), "--limit-train", str(limit_train), "--threads", "1",
            "--out", str(out), "--experiment", "memory", "--quiet"]
    cmd = [str(BIN / "mpiexec"), "-n", "2", str(BIN / "labtools"), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler(psutil.Process(proc.pid)) as s:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # mpiexec passes it to the ranks: nothing outlives the benchmark
            proc.communicate(timeout=60)
            raise SystemExit(f"{' '.join(cmd)} took over {timeout:.0f} s; stopped")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    run_dir = next((out / "memory").glob("*/summary.json")).parent
    ranks = {}
    for f in sorted((run_dir / "ranks").glob("rank_*.csv")):
        rows = list(csv.DictReader(f.open()))

        def peak(col):
            vals = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
            return max(vals) if vals else None

        ranks[int(rows[0]["rank"])] = {"peak_rss_mb": peak("peak_rss_mb"), "peak_pss_mb": peak("peak_pss_mb"),
                                       "peak_uss_mb": peak("peak_uss_mb")}
    manifest = results.read_json(run_dir / "manifest.json")
    pids = [pid for _, pid in manifest["pids"]]  # in rank order (processes = ranks here)
    outside = {r: {f"peak_{k}": v for k, v in s.peaks.get(pid, {}).items()} for r, pid in enumerate(pids)}
    def worst(rs):  # the higher of the records' and the outside sampler's peaks, over these ranks
        return max((v for r in rs for v in (ranks.get(r, {}).get("peak_rss_mb"), outside.get(r, {}).get("peak_rss_mb"))
                    if v is not None), default=None)

    return {"command": "mpiexec -n 2 labtools " + " ".join(a for a in args if not a.startswith(str(out))),
            "wall_s": time.perf_counter() - t0, "records_per_rank": ranks, "sampled_outside_per_rank": outside,
            # the root evaluates, probes dead ReLUs, gathers checkpoints and writes the records: its own line
            "root_peak_rss_mb": worst([0]), "non_root_peak_rss_mb": worst([r for r in ranks if r != 0]),
            "records_sum_pss_mb": sum(r["peak_pss_mb"] or 0 for r in ranks.values()) or None,
            "run_dir": provenance.portable_path(run_dir)}


def engine_runs(n: int, out: Path, cifar_dir: str | None) -> dict:
    """labtools.train.run n times in this process (np = 1, P = 1), memory after each."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from labtools.comm import Comm
    from labtools.config import RunConfig
    from labtools.train import run

    me = psutil.Process()
    cfg = RunConfig(np=1, limit_train=480, limit_test=100, epochs=1, quiet=True, threads=1,
                    out=str(out), experiment="engine", checkpoint=False, cifar_dir=cifar_dir)
    comm, after = Comm(), []
    before = _mem(me)
    for i in range(n):
        t0 = time.perf_counter()
        run(cfg, comm)
        gc.collect()
        after.append({"run": i + 1, "seconds": time.perf_counter() - t0, **_mem(me)})
        print(f"engine run {i + 1}: " + ", ".join(f"{k}={v:.1f}" for k, v in after[-1].items() if v is not None),
              flush=True)
    base, last = after[min(1, n - 1)], after[-1]
    return {"config": {k: v for k, v in cfg.to_dict().items() if k in ("np", "limit_train", "limit_test", "epochs",
                                                                       "threads", "sync", "diagnostics")},
            "before_first_run": before, "after_each_run": after,
            "growth_run5_vs_run2_pct": 100 * (last["rss_mb"] - base["rss_mb"]) / base["rss_mb"],
            "growth_run5_vs_run2_pss_pct": base["pss_mb"] and 100 * (last["pss_mb"] - base["pss_mb"]) / base["pss_mb"],
            "growth_run5_vs_run1_pct": 100 * (last["rss_mb"] - after[0]["rss_mb"]) / after[0]["rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-train", type=int, default=2400)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5, help="engine runs in one process (b)")
    ap.add_argument("--cifar-dir", default=os.environ.get("CIFAR10_DIR"))
    ap.add_argument("--skip-mpi", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "memory.json"))
    a = ap.parse_args()
    out: dict = {"limits": {"peak_rss_mb_per_rank_np2": 800, "engine_growth_pct": 5}}
    with tempfile.TemporaryDirectory(prefix="labtools-memory-") as tmp:
        if not a.skip_mpi:
            out["mpi_np2"] = mpi_run(a.limit_train, a.epochs, Path(tmp) / "mpi")
            out["mpi_np2"]["run_dir"] = "(temporary)"
            print({k: v for k, v in out["mpi_np2"].items() if k != "command"}, flush=True)
        if not a.skip_engine:
            out["engine"] = engine_runs(a.runs, Path(tmp) / "engine", a.cifar_dir)
    out.update(provenance.sidecar(date_utc=provenance.utc_now()))
    results.write_json(a.json, out)
    print(a.json)


if __name__ == "__main__":
    main()
