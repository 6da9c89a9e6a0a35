"""Benchmark: the synchronous step against the local step in the same two processes, interleaved.

Separate `labtools train` runs (bench/allreduce_overhead.py) compare steps taken minutes apart, and
this machine's speed swings by more than the difference between them. Here both processes build one
Worker each way and alternate, block by block, between
- local: epoch-average's steps (`Worker.train_steps`, no communication);
- allreduce: the synchronous steps `labtools train --sync allreduce` runs (`Worker.sync_steps`; at
  P = 2 Adam sharded between the processes);
- allreduce, Adam replicated: the same with LABTOOLS_SHARDED_ADAM=0 (pack, Allreduce, Adam on all);
each called as labtools calls them: 16 real CIFAR-10 batches per graph call (LABTOOLS_STEPS_PER_CALL),
batch 12 per process, one TensorFlow thread. The order of the three rotates from block to block. A
block's time is the slowest process's; its overhead is against the local steps of the same block, a
second or less apart, and the median over blocks is robust to the bursts in which this machine slows.

    python bench/allreduce_interleaved.py [--processes 2] [--blocks 120] [--calls 1]

(re-launches itself under the venv's mpiexec) and writes bench/results/allreduce_interleaved_p<P>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=120, help="blocks; each runs every variant once")
    ap.add_argument("--calls", type=int, default=1, help="graph calls per variant per block")
    ap.add_argument("--out", default=None, help="default: bench/results/allreduce_interleaved_p<P>.json")
    ap.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.launched:
        bindir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = ["mpiexec", "-n", str(a.processes), sys.executable, __file__, "--launched", "--blocks", str(a.blocks),
               "--calls", str(a.calls), *(["--out", a.out] if a.out else [])]
        sys.exit(subprocess.run(cmd, env=env).returncode)
    measure(a)


def measure(a):
    import numpy as np

    from labtools import data as D, mpi_op, provenance, results
    from labtools.comm import Comm
    from labtools.config import RunConfig, steps_per_call
    from labtools.train import _set_threads

    comm = Comm()
    _set_threads(1)  # one TensorFlow thread per process: P processes on P cores
    from labtools.worker import Worker

    path = D.find_cifar_dir(None)
    n_train = 12 * comm.size * 400
    cfg = RunConfig(np=comm.size, ranks_per_node=comm.size, batch_per_node=12 * comm.size, limit_train=n_train,
                    limit_test=100, sync="allreduce", diagnostics=False, cifar_dir=str(path))
    xtr, ytr, xte, yte = D.load_cifar10(path, limit_train=n_train, limit_test=100)

    def worker(sharded: str):
        with mock.patch.dict(os.environ, {"LABTOOLS_SHARDED_ADAM": sharded}):
            return Worker(cfg, comm, comm.size, xtr, ytr, xte, yte)

    w, w_rep = worker("1"), worker("0")
    n, b = steps_per_call(), w.b
    shard = w.shards[w.ranks[0]]
    calls_per_epoch = len(shard) // (n * b)
    pos = {"i": 0}

    def next_call():  # the next n real batches of this process's shard, cycling
        s = (pos["i"] % calls_per_epoch) * n
        pos["i"] += 1
        return s, [shard[(s + j) * b:(s + j + 1) * b] for j in range(n)]

    def local():
        s, idxs = next_call()
        w.train_steps(idxs, 0, s)

    def synced(wk):
        def call():
            s, idxs = next_call()
            x, y, k = wk.batch(np.concatenate(idxs), 0)
            wk.sync_steps(x.reshape(n, b, *x.shape[1:]), y.reshape(n, b), k.reshape(n, b), 0, s)
        return call

    variants = {"local": local, "allreduce": synced(w), "allreduce, Adam replicated": synced(w_rep)}
    names = list(variants)
    for name in names:  # warm: trace every graph
        for _ in range(2):
            variants[name]()
    per_block = {name: [] for name in names}
    cpu0 = _cpu_jiffies()
    for blk in range(a.blocks):
        order = names[blk % len(names):] + names[:blk % len(names)]
        for name in order:
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                variants[name]()
            # the slowest process decides, as in a synchronous job
            per_block[name].append(comm.max((time.perf_counter() - t0) / (a.calls * n)))
    cpu = {k: v - cpu0.get(k, 0) for k, v in _cpu_jiffies().items()}
    if not comm.is_root:
        return
    over = {name: [100 * (t / l - 1) for t, l in zip(per_block[name], per_block["local"])] for name in names[1:]}
    out = {"ms_per_step_median": {k: 1e3 * statistics.median(v) for k, v in per_block.items()},
           "ms_per_step_per_block": {k: [1e3 * x for x in v] for k, v in per_block.items()},
           "overhead_pct_per_block": over,
           "overhead_pct_median": {k: statistics.median(v) for k, v in over.items()},
           "processes": comm.size, "batch_per_rank": b, "steps_per_call": n, "calls_per_block": a.calls,
           "blocks": a.blocks, "cpu_jiffies_during": cpu, "allreduce_impl": mpi_op.reason(), "sharded_adam": w.sharded,
           **provenance.sidecar(date_utc=provenance.utc_now())}
    results.write_json(a.out or ROOT / "bench" / "results" / f"allreduce_interleaved_p{comm.size}.json", out)
    q = lambda v: [round(x, 1) for x in statistics.quantiles(v, n=4)]  # noqa: E731
    print({k: round(v, 3) for k, v in out["ms_per_step_median"].items()},
          {k: f"median {statistics.median(v):+.1f}%, quartiles {q(v)}" for k, v in over.items()})


def _cpu_jiffies() -> dict:
    """This machine's CPU time by kind (/proc/stat), to show how much the hypervisor took (steal)."""
    try:
        f = open("/proc/stat").readline().split()
    except OSError:
        return {}
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), map(int, f[1:9])))


if __name__ == "__main__":
    main()
