"""Benchmark: the paper's protocol across emulated hosts (network namespaces on this machine, tbf-shaped links).

For each np, `mpiexec` places 2 processes per emulated host (np/2 hosts) through labtools.emulate.Hosts
and runs `labtools train --np N --epochs E --limit-train L` (batch 12 per rank and every other
setting from the CLI's defaults; --threads 1 so the processes do not oversubscribe each other more
than they must). Writes bench/results/emulated_cluster.json: per np the launch's wall time, per-epoch
compute (`epoch_wall_s`) and sync (`sync_s`) times from the run's epochs.csv, the bytes that crossed
each host's veth, and the run record's path. Needs root.

The emulated hosts share this machine's cores: these are NOT cluster timings (cluster_wall_time is
false); what they show is that the data moves between hosts and how much of it there is.

    .venv/bin/python bench/emulated_cluster.py [--epochs 1] [--limit-train 2400] [--nps 2,4,6]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labtools import provenance, results  # noqa: E402
from labtools.emulate import Hosts  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit-train", type=int, default=2400)
    ap.add_argument("--limit-test", type=int, default=None, help="default: the CLI's (the whole test set)")
    ap.add_argument("--nps", default="2,4,6", help="comma-separated world sizes (8 needs 4 hosts)")
    ap.add_argument("--ppn", type=int, default=2, help="processes per emulated host")
    ap.add_argument("--rate", default="1gbit", help="tbf rate of every host's link")
    ap.add_argument("--threads", type=int, default=1, help="TensorFlow threads per process")
    ap.add_argument("--out", default=str(ROOT / "results" / "scratch"),
                    help="results root for the run records (default: results/scratch, outside the results store)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "emulated_cluster.json"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one training launch may take")
    a = ap.parse_args()
    nps = [int(x) for x in a.nps.split(",") if x]
    if any(n % a.ppn for n in nps):
        ap.error(f"every np must be a multiple of --ppn {a.ppn}")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    runs = {}
    with Hosts(max(n // a.ppn for n in nps), rate=a.rate) as h:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2",
               **h.env()}
        for n in nps:
            used = h.names[:n // a.ppn]
            run_id = f"np{n}-{stamp}"
            cmd = [str(BIN / "mpiexec"), *h.mpiexec_args(a.ppn, hosts=used, n=n), sys.executable, "-m",
                   "labtools.cli", "train", "--np", str(n), "--epochs", str(a.epochs), "--limit-train",
                   str(a.limit_train), *(["--limit-test", str(a.limit_test)] if a.limit_test else []),
                   "--threads", str(a.threads), "--quiet", "--out", a.out, "--experiment", "emulated-cluster",
                   "--run-id", run_id]
            load = os.getloadavg()[0]  # other work on the machine slows every emulated host alike
            before = h.veth_bytes()
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=a.timeout)
            wall = time.perf_counter() - t0
            after = h.veth_bytes()
            if p.returncode:
                sys.exit(f"np={n}: exit {p.returncode} after {wall:.0f}s:\n{p.stderr[-3000:]}")
            run_dir = Path(a.out) / "emulated-cluster" / run_id
            with open(run_dir / "epochs.csv") as f:
                epochs = list(csv.DictReader(f))
            summary = json.loads((run_dir / "summary.json").read_text())
            manifest = json.loads((run_dir / "manifest.json").read_text())
            moved = {k: after[k] - before[k] for k in used}
            runs[str(n)] = {
                "hosts": used, "cross_host": len(used) > 1, "processes_per_host": a.ppn, "loadavg_1m_before": load, "launch_wall_s": round(wall, 2),
                "global_wall_s": summary["global_wall_s"],
                "epoch_wall_s": [float(r["epoch_wall_s"]) for r in epochs],
                "sync_s": [float(r["sync_s"]) for r in epochs],
                "compute_s": [float(r["epoch_wall_s"]) - float(r["sync_s"]) for r in epochs],
                "eval_s": [float(r["eval_s"]) for r in epochs],
                "veth_bytes": moved, "veth_bytes_total": sum(moved.values()),
                "test_acc": summary.get("test_acc"), "final_weight_digest": sorted(set(summary["final_weight_digests"].values())),
                "batch_per_rank": summary["batch_per_rank"], "recorded_hosts": manifest["hosts"], "recorded_wall_time_kind": manifest.get("wall_time_kind"),
                "run_dir": provenance.portable_path(run_dir),  # no machine path in a tracked file
            }
            print(f"np={n}: {wall:.1f}s launch, epoch_wall_s={runs[str(n)]['epoch_wall_s']}, "
                  f"sync_s={runs[str(n)]['sync_s']}, veth MB={ {k: round(v / 1e6, 1) for k, v in moved.items()} }",
                  flush=True)
    out = {
        "note": (f"Emulated cluster: {math.ceil(max(nps) / a.ppn)} Linux network namespaces on ONE machine "
                 f"({os.cpu_count()} cores shared by all hosts), links shaped by tbf at {a.rate}, MPI over TCP "
                 f"(MPIR_CVAR_NOLOCAL=1, UCX_TLS=tcp). The hosts share this machine's cores, memory and disk: "
                 f"these are NOT cluster timings. veth_bytes counts rx+tx on each host's link (bridge side); "
                 f"a byte between two hosts is counted on both links; with {a.ppn} processes per host, np={a.ppn} runs on "
                 f"one host and crosses no link. epoch_wall_s is the slowest process's training time per epoch "
                 f"and includes sync_s (the weight average, timed on the root); compute_s is their difference. "
                 f"loadavg_1m_before: other work on this machine, which slows every emulated host alike."),
        "cluster_wall_time": False, "emulated_hosts": True, "rate": a.rate, "processes_per_host": a.ppn,
        "epochs": a.epochs, "limit_train": a.limit_train, "limit_test": a.limit_test, "threads": a.threads,
        "runs": runs, **provenance.sidecar(date_utc=provenance.utc_now()),
    }
    results.write_json(a.json, out)
    print(a.json)


if __name__ == "__main__":
    main()
