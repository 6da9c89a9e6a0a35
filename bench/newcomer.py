"""The newcomer's path, timed: a fresh clone, `make main` three times (the last beside a busy core),
`make figures`, and `git status` after each.

    python bench/newcomer.py [--data DIR] [--keep]

Clones this repository's HEAD into a temporary folder beside it, copies CIFAR-10 into the clone's
data/cifar-10-batches-py (as the README tells a newcomer to), unsets CIFAR10_DIR, then runs there:
  1. `make main`   (creates .venv, installs, computes the quick profile into an empty results/local/,
                    executes the notebooks): its time, runs computed vs reused, its terminal lines
  2. `make main`   again, the machine quiet: runs computed (0 expected), `git status` clean
  3. `make main`   again with one core busy-looping beside it (a laptop doing other work): 0 runs expected
  4. `make figures`: re-renders figures/paper from the committed records; `git status` must stay clean
Writes bench/results/newcomer.json. The data is copied from --data (default: where `labtools data where`
finds it; this machine is offline). pip's cache is whatever this machine has: the JSON says so.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labtools import data, provenance  # noqa: E402


def _run(cmd: list[str], cwd: Path, log: Path, busy: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CIFAR10_DIR", "LABTOOLS_RESULTS", "VIRTUAL_ENV")}
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None  # one core busy
    t0 = time.monotonic()
    try:
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env={**env, "CI": ""}).returncode
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    text = log.read_text(errors="replace")
    m = re.search(r"(\d+) runs to compute", text)
    nb = re.search(r"(\d+) notebooks in (\d+) s", text)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True).stdout
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t0, 1),
            "runs_computed": int(m.group(1)) if m else None,
            "reproduce_s": int(nb.group(2)) if nb else None,  # labtools reproduce alone (no venv, no install)
            "runs_started_lines": text.count("[run] started"), "runs_finished_lines": text.count("[run] finished"),
            "git_status_lines": [ln for ln in status.splitlines() if ln.strip()],
            "terminal_lines": len(text.splitlines()), "log_tail": text.splitlines()[-6:], "busy_core": busy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--data", default=None, help="CIFAR-10 folder to copy into the clone's data/ "
                                                 "(default: the one `labtools data where` finds)")
    a = ap.parse_args(argv)
    try:
        src = data.find_cifar_dir(a.data, download=False)
    except data.DataError as e:
        print(f"bench/newcomer.py: {e} (this benchmark copies the data, it does not download it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="newcomer-", dir=ROOT.parent))
    clone = work / "labtools"
    out = {"commit": provenance.git_commit(), "clone": "a fresh `git clone` of HEAD beside this checkout",
           "pip_cache": "warm (this machine's pip cache)", "steps": {}}
    try:
        t0 = time.monotonic()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        shutil.copytree(src, clone / "data" / data.FOLDER)  # as the README says: CIFAR-10 in the project's data/
        out["clone_s"] = round(time.monotonic() - t0, 1)
        out["data"] = "copied into the clone's data/cifar-10-batches-py; CIFAR10_DIR unset"
        for name, cmd, busy in (("make_main_1", ["make", "main"], False), ("make_main_2", ["make", "main"], False),
                                ("make_main_busy", ["make", "main"], True), ("make_figures", ["make", "figures"], False)):
            print(f"[newcomer] {name}: {' '.join(cmd)}" + (" (one core busy beside it)" if busy else ""), flush=True)
            r = out["steps"][name] = _run(cmd, clone, work / f"{name}.log", busy)
            print(f"[newcomer] {name}: rc {r['rc']} in {r['seconds']} s, runs computed {r['runs_computed']}, "
                  f"git status {len(r['git_status_lines'])} lines", flush=True)
            if r["rc"]:
                break
        out["total_s"] = round(time.monotonic() - t0, 1)
    finally:
        if a.keep:
            print(f"[newcomer] clone kept: {clone}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out.update(provenance.sidecar(date_utc=provenance.utc_now()))
    res = ROOT / "bench" / "results" / "newcomer.json"
    res.write_text(json.dumps(out, indent=1) + "\n")
    print(f"[newcomer] -> {res.relative_to(ROOT)}")
    return 0 if all(s["rc"] == 0 for s in out["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
