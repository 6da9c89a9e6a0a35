"""Benchmark: per-step cost of `allreduce` (gradient Allreduce every step) vs `epoch-average`.

Runs `mpiexec -n P labtools train` for each strategy on the same real CIFAR-10 subset, takes the
mean step time of the warm epochs from the per-rank records, and writes
bench/results/allreduce_overhead_p<P>.json:

    python bench/allreduce_overhead.py [--processes 2] [--steps 400] [--epochs 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
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
    per = {}
    for rep in range(a.repeats):
        for sync in ("epoch-average", "allreduce"):
            cfg = RunConfig(np=a.processes, ranks_per_node=a.processes, batch_per_node=12 * a.processes,
                            epochs=a.epochs, limit_train=a.steps * 12 * a.processes, limit_test=500,
                            sync=sync, diagnostics=False, quiet=True, out=tmp, experiment=sync, seed=rep,
                            threads=1)  # one TensorFlow thread per process: P processes on P cores
            s = runner(cfg, a.processes)
            rk = results.load_rank_epochs(s["run_dir"])
            warm = rk[rk.epoch > 1]
            per.setdefault(sync, []).append(float(warm.mean_step_s.mean()))
    ea = sum(per["epoch-average"]) / len(per["epoch-average"])
    ar = sum(per["allreduce"]) / len(per["allreduce"])
    out = {"mean_step_s": {"epoch-average": ea, "allreduce": ar}, "per_repeat": per,
           "allreduce_overhead_pct": 100 * (ar - ea) / ea, "processes": a.processes, "steps_per_epoch": a.steps,
           "warm_epochs": a.epochs - 1, "batch_per_rank": 12, **provenance.sidecar(date_utc=provenance.utc_now())}
    # one file per process count, so a run at another P does not overwrite the P = 2 measurement
    results.write_json(a.out or ROOT / "bench" / "results" / f"allreduce_overhead_p{a.processes}.json", out)
    print(json.dumps({k: out[k] for k in ("mean_step_s", "allreduce_overhead_pct")}, indent=1))


if __name__ == "__main__":
    main()
