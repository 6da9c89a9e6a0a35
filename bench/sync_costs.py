"""Benchmark: message cost alpha + beta * bytes, and the collectives labtools.sync uses, for the
performance model (labtools.perfmodel).

Each setting launches `mpiexec` on `--worker`, which times, for every message size up to the SqueezeNet
weight vector (n_params float32):

- ping-pong (buffer Send/Recv, one-way = round trip / 2) between ranks 0 and 1 (the same host when a
  host runs 2 processes) and, when p > 2, between rank 0 and the last rank (another host);
- gather + bcast of a float32 array as labtools.sync's epoch average calls them (mpi4py's pickled
  comm.gather / comm.bcast; the averaging arithmetic is left out), Bcast and Allreduce (buffers).

A time is the slowest rank's, the median over repeats. alpha and beta are fitted by least squares to
the ping-pong times (labtools.perfmodel.fit_link); pickling's extra cost per byte from a pickled
ping-pong (lower-case send/recv) against the buffer one. Settings:

- `here`: `mpiexec -n 2` on this machine (shared memory);
- when run as root, emulated hosts (labtools.emulate.Hosts, tbf-shaped veths, MPI over TCP), exactly as
  bench/emulated_cluster.py uses them: 2 hosts x 1 process, 3 hosts x 1 process, 2 hosts x 2 processes
  (two ranks sharing one host's link, as the paper's two ranks per RPi share its NIC).

Writes bench/results/sync_costs.json. The emulated hosts share this machine's cores: more processes than
cores (2 hosts x 2 processes on 2 cores) slows message progress as well.

    .venv/bin/python bench/sync_costs.py [--reps 15] [--no-emulated]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labtools import perfmodel, provenance, results  # noqa: E402

BIN = Path(sys.executable).parent
OPS = ("pingpong_rank1", "pingpong_last", "pingpong_pickled", "gather_bcast", "bcast", "allreduce")


def _sizes(n_bytes: int) -> list[int]:
    """8 B to the weight vector, about 4x apart (multiples of 4: float32 arrays)."""
    out, s = [], 8
    while s < n_bytes:
        out.append(s)
        s *= 4
    return out + [n_bytes]


# ------------------------------------------------------------------ inside mpiexec

def worker(sizes: list[int], reps: int, out: str) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, p = comm.Get_rank(), comm.Get_size()

    def timed(fn, n_rep):
        ts = []
        for _ in range(n_rep + 1):  # the first is a warm-up (connection setup, first-touch)
            comm.Barrier()
            t = time.perf_counter()
            fn()
            ts.append(comm.allreduce(time.perf_counter() - t, op=MPI.MAX))
        return statistics.median(ts[1:])

    def pingpong(a, b, buf, n_rep):
        recv = np.empty_like(buf)

        def go():
            if rank == a:
                comm.Send(buf, dest=b)
                comm.Recv(recv, source=b)
            elif rank == b:
                comm.Recv(recv, source=a)
                comm.Send(buf, dest=a)
        return timed(go, n_rep) / 2

    def pingpong_pickled(buf, n_rep):
        """Lower-case send/recv between ranks 0 and 1: pickled, as every comm.gather/comm.bcast message is."""
        def go():
            if rank == 0:
                comm.send(buf, dest=1)
                comm.recv(source=1)
            elif rank == 1:
                comm.send(comm.recv(source=0), dest=0)
        return timed(go, n_rep) / 2

    res = {op: {} for op in OPS}
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        out_buf = np.empty_like(buf)
        n_rep = reps if nbytes >= 1 << 16 else 5 * reps  # small messages are cheap and noisier
        if p > 1:
            res["pingpong_rank1"][nbytes] = pingpong(0, 1, buf, n_rep)
        if p > 2:
            res["pingpong_last"][nbytes] = pingpong(0, p - 1, buf, n_rep)
        res["gather_bcast"][nbytes] = timed(lambda: (comm.gather(buf, root=0), comm.bcast(buf if rank == 0 else None,
                                                                                            root=0)), n_rep)
        res["bcast"][nbytes] = timed(lambda: comm.Bcast(buf, root=0), n_rep)
        res["allreduce"][nbytes] = timed(lambda: comm.Allreduce(buf, out_buf, op=MPI.SUM), n_rep)
        if p > 1:
            res["pingpong_pickled"][nbytes] = pingpong_pickled(buf, n_rep)
    if rank == 0:
        Path(out).write_text(json.dumps({"p": p, "mpi": MPI.Get_library_version().splitlines()[0], **res}))


# ------------------------------------------------------------------ driver

def _launch(mpiexec_args: list[str], env: dict, sizes, reps, timeout) -> dict:
    with tempfile.TemporaryDirectory(prefix="sync-costs-") as tmp:
        os.chmod(tmp, 0o755)
        out = Path(tmp) / "out.json"
        cmd = [str(BIN / "mpiexec"), *mpiexec_args, sys.executable, str(Path(__file__).resolve()), "--worker",
               "--sizes", ",".join(map(str, sizes)), "--reps", str(reps), "--worker-out", str(out)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        if p.returncode:
            sys.exit(f"{' '.join(mpiexec_args)}: exit {p.returncode}:\n{p.stderr[-3000:]}")
        r = json.loads(out.read_text())
    r["launch_wall_s"] = round(time.perf_counter() - t0, 2)
    return r


def _fit(r: dict) -> dict:
    """alpha, beta per ping-pong pair present; what pickling adds per byte (largest message)."""
    fits = {}
    pk, buf = r.get("pingpong_pickled") or {}, r.get("pingpong_rank1") or {}
    if pk:
        big = max(pk, key=int)
        fits["pickle"] = {"s_per_byte": (pk[big] - buf[big]) / int(big), "at_bytes": int(big)}
    for op in ("pingpong_rank1", "pingpong_last"):
        pts = r.get(op) or {}
        if pts:
            link = perfmodel.fit_link([int(k) for k in pts], list(pts.values()))
            fits[op] = {"alpha_s": link.alpha_s, "beta_s_per_byte": link.beta_s_per_byte,
                        "bandwidth_MB_s": 1e-6 / link.beta_s_per_byte}
    return fits


def n_params() -> int:
    """Trainable parameters of the model labtools trains (what one weight average moves)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from labtools.model import squeezenet_v1_1

    return int(sum(int(v.numpy().size) for v in squeezenet_v1_1().trainable_variables))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="repeats per size (5x for messages under 64 KiB)")
    ap.add_argument("--rate", default="1gbit", help="tbf rate of every emulated host's link")
    ap.add_argument("--no-emulated", action="store_true", help="only this machine (no namespaces)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "sync_costs.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker([int(s) for s in a.sizes.split(",")], a.reps, a.worker_out)

    params = n_params()
    n_bytes = params * perfmodel.FLOAT32_BYTES
    sizes = _sizes(n_bytes)
    base_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    settings = {}
    r = _launch(["-n", "2"], base_env, sizes, a.reps, a.timeout)
    settings["here"] = {"hosts": 1, "processes_per_host": 2, "transport": "shared memory (mpich default)",
                        **r, "fit": _fit(r)}
    print("here:", json.dumps(settings["here"]["fit"]), flush=True)
    emulated_skipped = None
    if a.no_emulated:
        emulated_skipped = "--no-emulated"
    elif os.geteuid() != 0:
        emulated_skipped = "not root: emulated hosts need network namespaces"
    else:
        from labtools.emulate import Hosts

        with Hosts(3, rate=a.rate) as h:
            env = {**base_env, **h.env()}
            for hosts, ppn in ((2, 1), (3, 1), (2, 2)):
                name = f"emulated_{hosts}x{ppn}"
                used = h.names[:hosts]
                r = _launch(h.mpiexec_args(ppn, hosts=used, n=hosts * ppn), env, sizes, a.reps, a.timeout)
                settings[name] = {"hosts": hosts, "processes_per_host": ppn, "rate": a.rate,
                                  "transport": "TCP (MPIR_CVAR_NOLOCAL=1, UCX_TLS=tcp)", **r, "fit": _fit(r)}
                print(f"{name}:", json.dumps(settings[name]["fit"]), flush=True)
    out = {
        "note": ("alpha, beta: least squares on one-way ping-pong times, alpha through the messages up to 8 KiB, "
                 "beta through those from 512 KiB (labtools.perfmodel.fit_link); pickle: (pickled - buffer "
                 "ping-pong) / bytes at the largest size. A time is the "
                 "slowest rank's, median over repeats. pingpong_rank1 is ranks 0 and 1 (one host when "
                 "processes_per_host >= 2, otherwise two hosts), pingpong_last ranks 0 and p-1 (when p > 2). gather_bcast "
                 "is labtools.sync's epoch average (pickled comm.gather + comm.bcast) without the arithmetic. "
                 f"Emulated hosts are network namespaces on ONE machine ({os.cpu_count()} cores shared by all "
                 "processes), links shaped by tbf; not a cluster's timings."),
        "n_params": params, "weight_bytes": n_bytes, "sizes_bytes": sizes, "reps": a.reps,
        "cpu_count": os.cpu_count(), "emulated_skipped": emulated_skipped, "settings": settings,
        **provenance.sidecar(date_utc=provenance.utc_now()),
    }
    results.write_json(a.json, out)
    print(a.json)


if __name__ == "__main__":
    main()
