"""The five failures of issue 28, measured end to end: command, exit status, time to end, what was
printed, the record's state and what was left behind (processes, /dev/shm segments).

    python bench/fault_cases.py [--repo DIR] [--cases kill,stuck,host,checkpoint,manifest,cheap]

--repo runs another checkout's labtools (e.g. the code before a change) with this script; the
JSON goes to bench/results/fault_cases[-TAG].json. Needs real CIFAR-10 ($CIFAR10_DIR); the lost-host
case needs root (emulated hosts). Takes ~10 minutes (the `kill` case of old code waits for the
heartbeat limit).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = ["--np", "4", "--epochs", "3", "--limit-train", "960", "--limit-test", "100", "--quiet"]


def env(extra=None):
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2",
            **(extra or {})}


def mpiexec():
    return shutil.which("mpiexec", path=str(BIN))


def launch(repo, n, args, pre=(), extra_env=None, **kw):
    cmd = [*([mpiexec(), *pre, "-n", str(n)] if n else []), sys.executable, "-m", "labtools.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo,
                            env=env(extra_env), **kw)


def said(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("I0000", "W0000", "E0000",
                                                                                         "WARNING: All log"))]


def manifest(d: Path) -> dict:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return {"unreadable": repr(e)}


def wait_epochs(out: Path, exp: str, n: int, proc, timeout=300) -> Path:
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(proc.communicate())
        for m in (out / exp).glob("*/manifest.json"):
            if manifest(m.parent).get("epochs_done", 0) >= n:
                return m.parent
        time.sleep(0.05)
    raise RuntimeError("no epoch")


def worker(proc, rank) -> psutil.Process:
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            e = p.environ()
        except psutil.Error:
            continue
        if e.get("LABTOOLS_WORKER") == "1" and e.get("PMI_RANK") == str(rank):
            return p
    raise RuntimeError(f"rank {rank} not found")


def job(proc) -> tuple[list[psutil.Process], set[str]]:
    """The processes under a running mpiexec, and the /dev/shm files they map (other sessions on the
    machine have their own: only this job's count)."""
    procs = psutil.Process(proc.pid).children(recursive=True)
    segs = set()
    for p in procs:
        try:
            segs |= {m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/")}
        except psutil.Error:
            pass
    return procs, segs


def alive(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:60]}")
        except psutil.Error:
            pass
    return out


def left(segs) -> list[str]:
    return sorted(os.path.basename(p) for p in segs if os.path.exists(p))


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def zombies() -> int:
    return sum(1 for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE)


# ---------------------------------------------------------------------- the cases

def case_kill(repo, tmp, cifar):
    """kill -9 of every process of a job, under a parent that does not reap; then --resume."""
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: the orphans become this process's zombies
    out = tmp / "kill"
    p = launch(repo, 2, ["train", *RUN, "--cifar-dir", cifar, "--out", str(out), "--experiment", "k"])
    d = wait_epochs(out, "k", 1, p)
    procs, segs = job(p)
    for q in [psutil.Process(p.pid), *procs]:
        q.kill()
    t0 = time.time()
    time.sleep(0.5)
    listed = subprocess.run([sys.executable, "-m", "labtools.cli", "runs", "--results", str(out)], cwd=repo,
                            capture_output=True, text=True, env=env()).stdout
    row = [line for line in listed.splitlines() if d.name[:12] in line]
    first, accepted, tries = None, None, 0
    while time.time() - t0 < 200:
        r = launch(repo, 2, ["train", "--resume", str(d)])
        tries += 1
        try:
            rc = r.wait(timeout=3)  # a refusal comes before TensorFlow loads (~1.5 s)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is None or manifest(d).get("resumed"):
            accepted = time.time() - t0
            r.send_signal(signal.SIGTERM)
            r.communicate(timeout=60)
            break
        err = said(r.communicate()[1])
        first = first or {"rc": rc, "said": err[:3], "at_s": round(time.time() - t0, 1)}
        time.sleep(max(0.0, 10 - (time.time() - t0) % 10))
    res = {"case": "kill -9 of every process (N=4, P=2) under a non-reaping parent, then --resume",
           "zombies": zombies(), "runs_row": row, "first_refusal": first, "resume_accepted_after_s":
           accepted and round(accepted, 1), "tries": tries, "shm_left_after_resume": left(segs)}
    reap()
    return res


def case_stuck(repo, tmp, cifar, P, rank):
    out = tmp / f"stuck{P}"
    p = launch(repo, P, ["train", *RUN, "--cifar-dir", cifar, "--out", str(out), "--experiment", "s",
                         "--wait-limit", "20"])
    d = wait_epochs(out, "s", 1, p)
    time.sleep(0.5)
    victim = worker(p, rank)
    procs, segs = job(p)
    victim.suspend()
    t0 = time.time()
    try:
        _, err = p.communicate(timeout=180)
        took = time.time() - t0
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        took = None
    time.sleep(2)
    m = manifest(d)
    res = {"case": f"SIGSTOP of process {rank} (P={P}, --wait-limit 20)", "rc": p.returncode,
           "seconds": took and round(took, 1), "said": [x for x in said(err) if "labtools" in x][:4],
           "status": m.get("status"), "error": m.get("error"), "not_arrived": m.get("not_arrived"),
           "left_2s_after": alive(procs), "shm_left": left(segs)}
    try:
        victim.kill()
    except psutil.Error:
        pass
    return res


def case_host(repo, tmp, cifar):
    sys.path.insert(0, str(repo))
    from labtools.emulate import Hosts, netns_pids

    out = tmp / "host"
    with Hosts(2, rate="1gbit") as h:
        cmd = [mpiexec(), *h.mpiexec_args(1, n=2), sys.executable, "-m", "labtools.cli", "train", *RUN,
               "--threads", "1", "--cifar-dir", cifar, "--out", str(out), "--experiment", "h", "--wait-limit", "20"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo,
                             env=env(h.env()))
        d = wait_epochs(out, "h", 1, p)
        time.sleep(0.5)
        _, segs = job(p)
        subprocess.run(["ip", "link", "set", h.veths[1], "down"], check=True)
        t0 = time.time()
        try:
            _, err = p.communicate(timeout=120)
            took = time.time() - t0
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            took = None
        gone_at, left_at_30 = None, None
        while time.time() - t0 < 150:
            running = {n: netns_pids(n) for n in h.names}
            if time.time() - t0 >= 30 and left_at_30 is None:
                left_at_30 = {n: [" ".join(psutil.Process(q).cmdline())[:50] for q in v if psutil.pid_exists(q)]
                              for n, v in running.items()}
            if not any(running.values()):
                gone_at = time.time() - t0
                break
            time.sleep(0.5)
        m = manifest(d)
        return {"case": "link of host lt-h1 cut (2 emulated hosts x 1 process, --wait-limit 20)", "rc": p.returncode,
                "seconds": took and round(took, 1), "said": [x for x in said(err) if "labtools" in x][:4],
                "status": m.get("status"), "error": m.get("error"), "not_arrived": m.get("not_arrived"),
                "left_at_30s": left_at_30, "namespaces_empty_after_s": gone_at and round(gone_at, 1),
                "shm_left": left(segs)}


def case_checkpoint(repo, tmp, cifar):
    out = tmp / "ck"
    p = launch(repo, 0, ["train", "--np", "2", "--epochs", "2", "--limit-train", "480", "--limit-test", "100",
                         "--quiet", "--cifar-dir", cifar, "--out", str(out), "--experiment", "c", "--run-id", "base",
                         "--inject-failure", "0:1"])
    p.communicate(timeout=300)
    base = out / "c" / "base"
    rows = []
    for how in ("truncated", "one byte flipped", "emptied", "deleted"):
        d = out / "c" / how.replace(" ", "-")
        shutil.copytree(base, d)
        ck = d / "checkpoint.npz"
        data = ck.read_bytes()
        if how == "truncated":
            ck.write_bytes(data[:len(data) // 2])
        elif how == "one byte flipped":
            i = len(data) // 2
            ck.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
        elif how == "emptied":
            ck.write_bytes(b"")
        else:
            ck.unlink()
        t0 = time.time()
        r = launch(repo, 0, ["train", "--resume", str(d)])
        _, err = r.communicate(timeout=300)
        lines = said(err)
        rows.append({"case": f"checkpoint {how}, --resume", "rc": r.returncode, "seconds": round(time.time() - t0, 1),
                     "stderr_lines": len(lines), "said": [x for x in lines if "labtools" in x or "Error" in x][:3],
                     "status": manifest(d).get("status"), "epochs_done": manifest(d).get("epochs_done")})
    return rows


def case_manifest(repo, tmp):
    store = tmp / "store"
    shutil.copytree(ROOT / "results", store, ignore=shutil.ignore_patterns("local"))
    victim = sorted((store / "quickstart-quick").glob("*/manifest.json"))[0]
    victim.write_text(victim.read_text()[:300])
    code = ("import warnings, labtools.results as r\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    try: n = len(r.load_runs(%r, 'quickstart-quick', include_incomplete=True))\n"
            "    except Exception as e: n = f'{type(e).__name__}: {str(e)[:80]}'\n"
            "print(n); print([str(x.message)[:160] for x in w])") % str(store)
    lr = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, env=env())
    runs = subprocess.run([sys.executable, "-m", "labtools.cli", "runs", "--results", str(store), "--all",
                           "--experiment", "quickstart-quick"], cwd=repo, capture_output=True, text=True, env=env())
    t0 = time.time()
    rp = subprocess.run([sys.executable, "-m", "labtools.cli", "reproduce", "--profile", "quick", "--stored-only",
                         "--notebook", "02_strong_scaling", "--results", str(store), "--out", str(tmp / "fig")],
                        cwd=repo, capture_output=True, text=True, env=env())
    return {"case": f"{victim.relative_to(store)} cut to 300 bytes", "load_runs(include_incomplete=True)":
            lr.stdout.strip().splitlines() + said(lr.stderr)[-1:],
            "runs": [x for x in runs.stdout.splitlines() if "unreadable" in x][:1],
            "reproduce --stored-only rc": rp.returncode, "reproduce seconds": round(time.time() - t0, 1),
            "reproduce said": said(rp.stderr)[-2:]}


def case_cheap(repo, tmp, cifar):
    rows = []
    out = tmp / "cheap"
    p = launch(repo, 0, ["train", "--epochs", "1", "--limit-train", "48", "--limit-test", "20", "--quiet",
                         "--cifar-dir", cifar, "--out", str(out), "--experiment", "e", "--run-id", "taken"])
    p.communicate(timeout=300)
    for args in (["--run-id", "taken", "--epochs", "1", "--limit-train", "48", "--cifar-dir", cifar, "--out", str(out),
                  "--experiment", "e"], ["--seed", "-1"], ["--wait-limit", "-3"]):
        t0 = time.time()
        r = launch(repo, 2, ["train", *args])
        _, err = r.communicate(timeout=300)
        rows.append({"case": "train " + " ".join(a if not a.startswith("/") else "…" for a in args), "rc": r.returncode,
                     "seconds": round(time.time() - t0, 1), "said": said(err)[:2]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--tag", default="")
    ap.add_argument("--commit", default=None, help="the commit --repo holds, when it is not a git checkout")
    ap.add_argument("--cases", default="cheap,checkpoint,manifest,stuck,kill,host")
    a = ap.parse_args()
    cifar = os.environ.get("CIFAR10_DIR") or str(ROOT / "data" / "cifar-10-batches-py")
    repo = Path(a.repo).resolve()
    res = []
    with tempfile.TemporaryDirectory(prefix="fault-cases-") as t:
        tmp = Path(t)
        for c in a.cases.split(","):
            t0 = time.time()
            try:
                if c == "stuck":
                    r = [case_stuck(repo, tmp, cifar, 2, 1), case_stuck(repo, tmp, cifar, 4, 2)]
                elif c == "kill":
                    r = case_kill(repo, tmp, cifar)
                elif c == "host":
                    r = case_host(repo, tmp, cifar)
                elif c == "checkpoint":
                    r = case_checkpoint(repo, tmp, cifar)
                elif c == "manifest":
                    r = case_manifest(repo, tmp)
                else:
                    r = case_cheap(repo, tmp, cifar)
            except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
                r = {"case": c, "bench_error": f"{type(e).__name__}: {e}"[:500]}
            res += r if isinstance(r, list) else [r]
            print(json.dumps(res[-1] if not isinstance(r, list) else r, indent=1), flush=True)
            print(f"-- {c}: {time.time() - t0:.0f}s", flush=True)
    dest = ROOT / "bench" / "results" / f"fault_cases{'-' + a.tag if a.tag else ''}.json"
    dest.write_text(json.dumps({"repo_commit": a.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo,
                                                                          capture_output=True, text=True).stdout.strip(),
                                "cases": res}, indent=1) + "\n")
    print(dest)


if __name__ == "__main__":
    main()
