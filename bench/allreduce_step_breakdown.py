"""Benchmark: where the `allreduce` step's extra time goes, at P processes, batch 12 per rank.

    mpiexec -n 2 python bench/allreduce_step_breakdown.py [--iters 400] [--repeats 3]

Times, in a tight loop on real CIFAR-10 images (ms per step, mean over repeats, interleaved):
- local_step: epoch-average's step (forward, backward, Adam);
- allreduce_step: the synchronous step labtools runs (at P = 2: Adam sharded over the two processes,
  gradients and weights exchanged straight from and into the variables; else as the next line);
- allreduce_step_replicated_adam: the step with LABTOOLS_SHARDED_ADAM=0 (pack, in-place Allreduce,
  Adam on every parameter);
- allreduce_step_no_comm: that step with the Allreduce replaced by identity (pack/unpack only);
- allreduce_only: MPI Allreduce of the gradient buffer alone (in place).
The root writes bench/results/allreduce_step_breakdown_p<P>.json (one file per process count,
so a run at another P does not overwrite the committed P = 2 measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="default: bench/results/allreduce_step_breakdown_p<P>.json")
    a = ap.parse_args()

    from labtools import data as D, provenance, results
    from labtools.comm import Comm, default_threads
    from labtools.config import RunConfig
    from labtools.train import _set_threads

    comm = Comm()
    _set_threads(default_threads(comm))
    from labtools.worker import Worker

    path = D.find_cifar_dir(None)
    cfg = RunConfig(np=comm.size, ranks_per_node=comm.size, batch_per_node=12 * comm.size, limit_train=4800,
                    limit_test=100, sync="allreduce", diagnostics=False, cifar_dir=str(path))
    xtr, ytr, xte, yte = D.load_cifar10(path, limit_train=4800, limit_test=100)
    w = Worker(cfg, comm, comm.size, xtr, ytr, xte, yte)
    x, y, k = w.batch(w.shards[w.ranks[0]][:12], 0)
    inv = np.float32(1.0 / w.global_count(0))
    buf = np.zeros(w.n_params + 1, np.float32)

    # The step labtools ran before Adam was sharded (LABTOOLS_SHARDED_ADAM=0: pack, Allreduce, Adam on
    # every parameter), and that step with the Allreduce replaced by identity (packing and unpacking
    # only): Workers whose graphs were built that way, or, on the mpi4py path, the same graph with
    # comm.allreduce_inplace a no-op while it runs.
    import types
    from unittest import mock

    from labtools import mpi_op

    with mock.patch.dict(os.environ, {"LABTOOLS_SHARDED_ADAM": "0"}):
        w_rep = Worker(cfg, comm, comm.size, xtr, ytr, xte, yte)
        real_lib = mpi_op._lazy.op
        if real_lib is not None:
            mpi_op._lazy.op = types.SimpleNamespace(labtools_allreduce=lambda flat, _comm: flat)
            try:
                w_nc = Worker(cfg, comm, comm.size, xtr, ytr, xte, yte)
            finally:
                mpi_op._lazy.op = real_lib
        else:
            w_nc = w_rep
    real = comm.allreduce_inplace

    def step_no_comm():
        comm.allreduce_inplace = lambda a: None
        try:
            return [np.asarray(v) for v in w_nc.allreduce_step(x, y, k, inv)]
        finally:
            comm.allreduce_inplace = real

    cases = {
        "local_step": lambda: [float(v) for v in w.local_step(x, y, k)],
        "allreduce_step": lambda: [np.asarray(v) for v in w.allreduce_step(x, y, k, inv)],
        "allreduce_step_replicated_adam": lambda: [np.asarray(v) for v in w_rep.allreduce_step(x, y, k, inv)],
        "allreduce_step_no_comm": step_no_comm,
        "allreduce_only": lambda: comm.allreduce_inplace(buf),
    }
    per = {name: [] for name in cases}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            for _ in range(20):
                fn()
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                fn()
            # the slowest process decides, as in a synchronous job
            per[name].append(comm.max(1e3 * (time.perf_counter() - t0) / a.iters))
    ms = {n: float(np.mean(v)) for n, v in per.items()}
    if comm.is_root:
        base = ms["local_step"]
        out = {"ms_per_step": ms, "per_repeat_ms": per, "processes": comm.size, "batch_per_rank": 12,
               "iters": a.iters, "n_params": w.n_params, "allreduce_impl": mpi_op.reason(), "sharded_adam": w.sharded,
               "overhead_pct": {"allreduce_step": 100 * (ms["allreduce_step"] - base) / base,
                                "allreduce_step_replicated_adam": 100 * (ms["allreduce_step_replicated_adam"] - base) / base,
                                "pack_unpack_only": 100 * (ms["allreduce_step_no_comm"] - base) / base,
                                "allreduce_only": 100 * ms["allreduce_only"] / base},
               **provenance.sidecar(date_utc=provenance.utc_now())}
        path = a.out or ROOT / "bench" / "results" / f"allreduce_step_breakdown_p{comm.size}.json"
        results.write_json(path, out)
        print({k: round(v, 3) for k, v in ms.items()}, {k: round(v, 1) for k, v in out["overhead_pct"].items()})


if __name__ == "__main__":
    main()
