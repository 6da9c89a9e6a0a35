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

ENV_WORKER = "LABTOOLS_WORKER"
ENV_FD = "LABTOOLS_KEEPER_FD"


def tell(run_dir) -> None:
    """Worker side: tell the keeper (if any) which run folder this process writes to."""
    fd = os.environ.get(ENV_FD)
    if fd:
        try:
            os.write(int(fd), f"{run_dir}\n".encode())
        except OSError:
            pass


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

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    rc = child.wait()
    with os.fdopen(r, "rb") as f:
        told = f.read().decode(errors="replace").split()
    if rc >= 0:
        return rc
    sig = signal.Signals(-rc).name
    rank = process_rank()
    who = f"process {rank}" if rank is not None else "the training process"
    msg = f"{who} (host {socket.gethostname()}, pid {child.pid}) was killed by {sig}"
    run_dir = told[-1] if told else None
    if run_dir:
        msg += _mark(run_dir, msg)
    print(f"labtools: {msg}", file=sys.stderr, flush=True)
    return 128 - rc


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
