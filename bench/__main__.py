"""Every benchmark, one command: ``python -m bench`` (or ``make bench``), on an otherwise idle machine.

Runs, in this order, each writing its JSON under bench/results/:
  step      bench/step_speed.py          labtools train vs Keras fit, P = 2 efficiency
  bound     bench/step_bound.py          forward+backward alone vs fit: the most any step could gain
  allreduce bench/allreduce_overhead.py  --sync allreduce vs epoch-average at P = 2, separate runs
  syncstep  bench/allreduce_interleaved.py  the same steps in the same two processes, interleaved
  memory    bench/memory.py              peak RSS / PSS / USS per rank, engine memory over 5 runs
  sync      bench/sync_costs.py          MPI alpha, beta here and on emulated 1 Gbit/s hosts (root)
  model     bench/perfmodel_report.py    the cluster model: paper Table 2 predicted, model vs here
  newcomer  bench/newcomer.py            a fresh clone: make main twice and make figures, timed, git status
then renders bench/results/summary.md from the JSON and puts it in the README's bench block.

    python -m bench [--only step,allreduce] [--quick]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import summary  # noqa: E402

STEPS = {
    "step": ["bench/step_speed.py", "--repeats", "5"],
    "bound": ["bench/step_bound.py", "--repeats", "9"],
    "allreduce": ["bench/allreduce_overhead.py", "--processes", "2", "--steps", "400", "--epochs", "3", "--repeats", "4"],
    "syncstep": ["bench/allreduce_interleaved.py", "--processes", "2", "--blocks", "120", "--calls", "1"],
    "memory": ["bench/memory.py"],
    "sync": ["bench/sync_costs.py"],
    "model": ["bench/perfmodel_report.py"],
    "newcomer": ["bench/newcomer.py"],
}
QUICK = {"step": ["--repeats", "1", "--images", "2400"], "bound": ["--repeats", "1", "--images", "1200"], "allreduce": ["--repeats", "1", "--steps", "200"],
         "syncstep": ["--blocks", "6"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="one short repeat each (a smoke run, not a measurement)")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    if unknown := [n for n in names if n not in STEPS]:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    for n in names:
        t0 = time.monotonic()
        print(f"[bench] {n}: {' '.join(STEPS[n])}", flush=True)
        r = subprocess.run([sys.executable, *STEPS[n], *(QUICK.get(n, []) if a.quick else [])], cwd=ROOT)
        if r.returncode:
            print(f"[bench] {n} failed (exit {r.returncode}); the summary keeps its previous JSON", file=sys.stderr)
            return r.returncode
        print(f"[bench] {n} done in {time.monotonic() - t0:.0f} s", flush=True)
    changed = summary.write(ROOT)
    print(f"[bench] summary: bench/results/summary.md{' (README updated)' if changed else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
