"""The keeper: a small parent process that outlives the training process it starts.

`labtools train` under mpiexec (or Slurm) starts as the keeper; it runs the real work as a child
(same command, LABTOOLS_WORKER=1) and waits for it. A process killed outright (kill -9, the OOM
killer) cannot say anything about itself, and mpiexec then kills every other process at once; the
keeper of the killed process is the one that survives to say which process died, on which host and
by which signal, and to mark the run `failed` so it never reads `running` forever. SIGTERM and
SIGINT sent to the keeper are passed on to the child, which stops at its next step (status
`interrupted`). The child dies with its keeper (PR_SET_PDEATHSIG), so no orphan keeps training.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

ENV_WORKER = "LABTOOLS_WORKER"
ENV_FD = "LABTOOLS_KEEPER_FD"


def tell(run_dir=None, shm=()) -> None:
    """Worker side: tell the keeper (if any) which run folder this process writes to, and which MPI
    shared-memory segments it maps (removed by the keeper if the worker does not end cleanly)."""
    fd = os.environ.get(ENV_FD)
    if fd:
        lines = ([f"run {run_dir}"] if run_dir else []) + [f"shm {p}" for p in shm]
        try:
            os.write(int(fd), "".join(line + "\n" for line in lines).encode())
        except OSError:
            pass


def remove_segments(paths) -> list[str]:
    """Unlink MPI shared-memory segments of a job that ended badly (MPICH removes them only in
    MPI_Finalize). Processes that still map one keep their mapping; the name is gone."""
    gone = []
    for p in paths:
        if p.startswith("/dev/shm/"):
            try:
                os.unlink(p)
                gone.append(p)
            except OSError:
                pass
    return gone


def process_rank() -> int | None:
    """This process's MPI rank from the launcher's environment (before MPI is initialised)."""
    for k in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return None


def _inherited() -> list[int]:
    """Descriptors the launcher handed this process (PMI_FD of mpiexec or srun): the child needs them."""
    out = []
    for name in (os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                out.append(fd)
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return out


def _die_with_parent(parent: int):
    def pre():
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # not Linux: an orphaned child is then mpiexec's to clean up
        if os.getppid() != parent:  # the keeper died before prctl took effect
            os._exit(1)
    return pre


def keep(argv: list[str]) -> int:
    """Run `python -m labtools.cli *argv` as a child; return its exit status (128+signal if killed)."""
    r, w = os.pipe()
    env = {**os.environ, ENV_WORKER: "1", ENV_FD: str(w)}
    child = subprocess.Popen([sys.executable, "-m", "labtools.cli", *argv], env=env, pass_fds=(w, *_inherited()),
                             preexec_fn=_die_with_parent(os.getpid()), start_new_session=True)
    os.close(w)

    def forward(sig, _frame):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass

        # the worker stops at its next step; one that does not (stuck in a collective whose peers
        # are gone) is killed after a grace period, so no orphan keeps running
        threading.Thread(target=_kill_later, args=(child, KILL_GRACE_S), daemon=True).start()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    rc = child.wait()
    with os.fdopen(r, "rb") as f:
        told = [line.split(" ", 1) for line in f.read().decode(errors="replace").splitlines() if " " in line]
    if rc != 0:
        remove_segments([v for k, v in told if k == "shm"])
    if rc >= 0:
        return rc
    sig = signal.Signals(-rc).name
    rank = process_rank()
    who = f"process {rank}" if rank is not None else "the training process"
    msg = f"{who} (host {socket.gethostname()}, pid {child.pid}) was killed by {sig}"
    runs = [v for k, v in told if k == "run"]
    run_dir = runs[-1] if runs else None
    if run_dir:
        msg += _mark(run_dir, msg)
    print(f"labtools: {msg}", file=sys.stderr, flush=True)
    return 128 - rc


KILL_GRACE_S = 20.0


def _kill_later(child: subprocess.Popen, after: float) -> None:
    try:
        child.wait(after)
    except subprocess.TimeoutExpired:
        child.kill()


def _mark(run_dir: str, msg: str) -> str:
    """Mark the record failed (the dead process cannot); say where it can be continued from."""
    try:
        from .record import FAILED, RunRecord

        rec = RunRecord(run_dir)
        rec.mark(FAILED, msg)
        ck = (rec.dir / "checkpoint.npz").is_file()
        return (f"; run {run_dir} marked failed" +
                (f"; continue it with `labtools train --resume {run_dir}`" if ck else " (no checkpoint yet)"))
    except Exception as e:  # noqa: BLE001 - the line above must still be printed
        return f"; could not mark {run_dir} ({type(e).__name__}: {e})"
