"""Benchmark: per-step cost of `allreduce` (gradient Allreduce every step) vs `epoch-average`.

Runs `mpiexec -n P labtools train` for each strategy on the same real CIFAR-10 subset, takes the
mean step time of the warm epochs from the per-rank records, and writes
bench/results/allreduce_overhead_p<P>.json:

    python bench/allreduce_overhead.py [--processes 2] [--steps 400] [--epochs 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labtools import provenance, results  # noqa: E402
from labtools.config import RunConfig  # noqa: E402
from labtools.experiments import MpiexecRunner  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400, help="steps per rank per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: bench/results/allreduce_overhead_p<P>.json")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-")
    runner = MpiexecRunner()
    # The earlier paths, in the same run: "allreduce, Adam replicated" (LABTOOLS_SHARDED_ADAM=0: the
    # gradients packed, one in-graph Allreduce, Adam on every parameter in each process) and "allreduce,
    # via mpi4py" (LABTOOLS_MPI_OP=0: the buffer handed to Python through tf.numpy_function, reduced by
    # mpi4py, Adam replicated).
    variants = {"epoch-average": ("epoch-average", {}), "allreduce": ("allreduce", {}),
                "allreduce, Adam replicated": ("allreduce", {"LABTOOLS_SHARDED_ADAM": "0"}),
                "allreduce, via mpi4py": ("allreduce", {"LABTOOLS_MPI_OP": "0"})}
    per, kernels = {}, {}
    for rep in range(a.repeats):
        for name, (sync, env) in variants.items():
            cfg = RunConfig(np=a.processes, ranks_per_node=a.processes, batch_per_node=12 * a.processes,
                            epochs=a.epochs, limit_train=a.steps * 12 * a.processes, limit_test=500,
                            sync=sync, diagnostics=False, quiet=True, out=tmp, experiment=sync, seed=rep,
                            threads=1, checkpoint=False)  # one TensorFlow thread per process: P processes on P cores
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                s = runner(cfg, a.processes)
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            rk = results.load_rank_epochs(s["run_dir"])
            warm = rk[rk.epoch > 1]
            per.setdefault(name, []).append(float(warm.mean_step_s.mean()))
            # which implementations ran (the manifest says)
            kernels[name] = json.loads((Path(s["run_dir"]) / "manifest.json").read_text()).get("kernels")
    mean = {k: sum(v) / len(v) for k, v in per.items()}
    ea = mean["epoch-average"]
    out = {"mean_step_s": mean, "per_repeat": per,
           "allreduce_overhead_pct": 100 * (mean["allreduce"] - ea) / ea,
           "allreduce_replicated_adam_overhead_pct": 100 * (mean["allreduce, Adam replicated"] - ea) / ea,
           "allreduce_via_mpi4py_overhead_pct": 100 * (mean["allreduce, via mpi4py"] - ea) / ea,
           "overhead_pct_per_repeat": {k: [100 * (x - e) / e for x, e in zip(per[k], per["epoch-average"])]
                                       for k in per if k != "epoch-average"},
           "processes": a.processes, "steps_per_epoch": a.steps,
           "warm_epochs": a.epochs - 1, "batch_per_rank": 12, "kernels": kernels,
           **provenance.sidecar(date_utc=provenance.utc_now())}
    # one file per process count, so a run at another P does not overwrite the P = 2 measurement
    results.write_json(a.out or ROOT / "bench" / "results" / f"allreduce_overhead_p{a.processes}.json", out)
    print(json.dumps({k: out[k] for k in ("mean_step_s", "allreduce_overhead_pct", "allreduce_replicated_adam_overhead_pct",
                                                  "allreduce_via_mpi4py_overhead_pct")},
                     indent=1))


if __name__ == "__main__":
    main()
