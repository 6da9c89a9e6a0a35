"""Lean ranks: a process loads only the rows it uses (same numbers as the full load), records carry
peak PSS/USS beside RSS, and a process that runs several trainings (a notebook engine) keeps nothing
of a finished run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_mpi

from labtools import data as D


class _Comm:  # what train._load asks of a Comm
    def __init__(self, size, rank):
        self.size, self.rank, self.is_root = size, rank, rank == 0


def _full(cifar_dir, limit_train, limit_test, val_split):
    xtr, ytr, xte, yte = D.load_cifar10(cifar_dir, limit_train=limit_train, limit_test=limit_test, test=not val_split)
    return D.split_validation(xtr, ytr, val_split) if val_split else (xtr, ytr, xte, yte)


@pytest.mark.parametrize("world,processes,limit_train,limit_test,val_split",
                         [(2, 2, None, None, 0), (4, 2, 480, 100, 0), (4, 2, 480, None, 96), (3, 3, 1000, 50, 0)])
def test_a_process_holds_only_its_rows_and_they_equal_the_full_load(cifar_dir, world, processes, limit_train,
                                                                      limit_test, val_split):
    from labtools.config import RunConfig
    from labtools.train import PROBE_ROWS, _load

    full = _full(cifar_dir, limit_train, limit_test, val_split)
    n, n_eval = len(full[1]), len(full[3])
    k = world // processes
    cfg = RunConfig(limit_train=limit_train, limit_test=limit_test, val_split=val_split, diagnostics=True)
    for p in range(processes):
        lean = _load(cfg, _Comm(processes, p), cifar_dir, world)
        assert [len(a) for a in lean] == [n, n, n_eval, n_eval]  # the Worker sizes shards from len(ytr)
        mine = np.concatenate([D.shard_indices(n, world, r) for r in range(p * k, (p + 1) * k)])
        probe = np.arange(min(PROBE_ROWS, n)) if p == 0 else np.arange(0)
        held = np.union1d(mine, probe)
        ev = np.arange(p, n_eval, processes)
        # only these rows are in memory: O(n/P) training images plus the evaluated rows
        assert np.array_equal(lean[0].held, held) and lean[0].data.shape == (len(held), 32, 32, 3)
        assert np.array_equal(lean[2].held, ev) and lean[2].data.shape == (len(ev), 32, 32, 3)
        assert lean[0].data.nbytes == len(held) * 3072 and len(lean[1].data) == len(held)
        # indexed by global row number, exactly as the full arrays (shuffled epoch orders included)
        order = np.random.default_rng(p).permutation(mine)
        for a, b, idx in ((lean[0], full[0], order), (lean[1], full[1], order), (lean[0], full[0], probe),
                          (lean[2], full[2], ev), (lean[3], full[3], ev)):
            got = a[idx]
            assert got.dtype == b.dtype and np.array_equal(got, b[idx])
        others = np.setdiff1d(np.arange(n), held)
        if len(others):
            with pytest.raises(IndexError, match="not held by this process"):
                lean[0][others[:3]]


def test_lean_load_reads_only_the_batches_it_needs(cifar_dir, monkeypatch):
    read = []
    real = D._load_batch
    monkeypatch.setattr(D, "_load_batch", lambda path: read.append(Path(path).name) or real(path))
    D.load_rows(cifar_dir, 2, 2, 1, limit_train=480, limit_test=100)
    assert read == ["data_batch_1", "test_batch"]  # each md5-checked as it is read (_load_batch)


def test_monitor_reports_pss_and_uss_beside_rss():
    from labtools.monitor import Monitor

    with Monitor(interval=0.05) as mon:
        junk = np.ones(20 * 2**20 // 8)  # 20 MB touched
        m = mon.lap_all()
        del junk
    assert set(m) == {"peak_rss_mb", "peak_pss_mb", "peak_uss_mb", "cpu_pct"}
    assert m["peak_rss_mb"] > 20
    if sys.platform.startswith("linux"):  # PSS where the OS gives it
        assert 0 < m["peak_uss_mb"] <= m["peak_pss_mb"] <= m["peak_rss_mb"] + 1
    assert mon.lap()[0] > 0  # the old two-value lap still works


def _digests_and_ranks(out: Path, experiment: str):
    d = next((out / experiment).glob("*/summary.json")).parent
    s = json.loads((d / "summary.json").read_text())
    return s, pd.concat([pd.read_csv(p) for p in sorted((d / "ranks").glob("rank_*.csv"))])


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("world,sync", [(4, "epoch-average"), (2, "allreduce")])
def test_lean_load_gives_the_full_loads_weights_bit_for_bit(cifar_dir, tmp_path, world, sync):
    """P = 2 processes, N = 4 logical ranks or N = 2 real ranks: same final weight digests (and test
    loss) whether every process loads everything (LABTOOLS_FULL_LOAD=1, the old way) or only its rows."""
    args = ["train", "--np", str(world), "--sync", sync, "--epochs", "1", "--limit-train", "240", "--limit-test", "50",
            "--threads", "1", "--quiet", "--cifar-dir", cifar_dir, "--out", str(tmp_path)]
    for name, env in (("lean", {}), ("full", {"LABTOOLS_FULL_LOAD": "1"})):
        r = run_mpi(2, [*args, "--experiment", name], timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    (lean, ranks), (full, _) = (_digests_and_ranks(tmp_path, e) for e in ("lean", "full"))
    assert lean["final_weight_digests"] == full["final_weight_digests"]
    assert len(set(lean["final_weight_digests"].values())) == 1 and len(lean["final_weight_digests"]) == world
    assert lean["test_loss"] == full["test_loss"] and lean["test_acc"] == full["test_acc"]
    # the per-rank records carry PSS and USS beside RSS
    assert {"peak_rss_mb", "peak_pss_mb", "peak_uss_mb"} <= set(ranks)
    assert (ranks.peak_uss_mb > 0).all() and (ranks.peak_uss_mb <= ranks.peak_pss_mb).all()
    assert (ranks.peak_pss_mb <= ranks.peak_rss_mb + 1).all()


FIVE_RUNS = r"""
import gc, json, os, sys
import psutil
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import keras
from labtools.comm import Comm
from labtools.config import RunConfig
from labtools.train import run
from labtools.worker import Worker

cfg = RunConfig(np=1, limit_train=96, limit_test=20, epochs=1, quiet=True, threads=1, checkpoint=False,
                cifar_dir=sys.argv[1], out=sys.argv[2], experiment="engine")
comm, me, rss = Comm(), psutil.Process(), []
for i in range(5):
    run(cfg, comm)
    gc.collect()
    rss.append(me.memory_info().rss / 2**20)
alive = lambda: (sum(isinstance(o, keras.Model) for o in gc.get_objects()),
                 sum(isinstance(o, Worker) and bool(o.__dict__) for o in gc.get_objects()))
after_ok = alive()
try:  # a failed run, its traceback kept (as IPython keeps the last one): it must hold nothing big either
    run(cfg.replace(inject_failure="0:0"), comm)
except Exception as e:
    kept = e
gc.collect()
print(json.dumps({"rss": rss, "alive_after_runs": after_ok, "alive_after_failure": alive(),
                  "failed": type(kept).__name__}))
"""


@pytest.mark.slow
def test_five_runs_in_one_process_do_not_grow(cifar_dir, tmp_path):
    """A notebook engine runs training after training: after the first run (TensorFlow's start, the
    first tracing) memory stays flat (run 5 within 5 % of run 2) and no model or Worker survives a
    run, finished or failed."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("LABTOOLS_FULL_LOAD", None)
    r = subprocess.run([sys.executable, "-c", FIVE_RUNS, cifar_dir, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rss = out["rss"]
    assert (rss[4] - rss[1]) / rss[1] <= 0.05, rss
    assert out["alive_after_runs"] == [0, 0], out
    assert out["alive_after_failure"] == [0, 0] and out["failed"] in ("RankFailure", "InjectedFailure"), out
