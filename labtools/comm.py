"""The thin layer over mpi4py: world, rank, the few collectives labtools uses, error agreement, abort.

Failure rule: before every collective a process calls ``agree(ok)``; if any process failed, every
process raises RankFailure with the failing ranks' messages, so nobody waits forever in a
collective. The CLI turns an uncaught exception into ``Abort`` as the last resort (a rank killed
outright is MPI's own job to clean up; mpiexec does so).
"""
from __future__ import annotations

import os
import socket
import sys

import numpy as np


class RankFailure(RuntimeError):
    """Raised on every process when any process reported a failure."""


class Comm:
    def __init__(self, mpi_comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.c = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.c.Get_rank()
        self.size = self.c.Get_size()
        self.host = socket.gethostname()
        # processes sharing this host (for the default thread count)
        self.node = self.c.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = self.node.Get_size()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # --------------------------------------------------------- agreement
    ERR_TAG = 7301

    def post_error(self, msg: str) -> None:
        """Tell every other process, without blocking, that this one failed (they poll per step)."""
        self._posted = [self.c.isend(msg, dest=d, tag=self.ERR_TAG) for d in range(self.size) if d != self.rank]

    def error_pending(self) -> bool:
        return self.size > 1 and self.c.iprobe(source=self.MPI.ANY_SOURCE, tag=self.ERR_TAG)

    def agree(self, error: BaseException | str | None) -> None:
        """Collective: raise RankFailure everywhere if any process passed an error.

        A failed process must have called post_error first; here every process also consumes the
        notices addressed to it, so a pool of engines is clean for the next run.
        """
        msg = None if error is None else (error if isinstance(error, str) else f"{type(error).__name__}: {error}")
        msgs = self.c.allgather(msg)
        failed = [i for i, m in enumerate(msgs) if m]
        if not failed:
            return
        for _ in range(len([i for i in failed if i != self.rank])):
            self.c.recv(source=self.MPI.ANY_SOURCE, tag=self.ERR_TAG)
        for req in getattr(self, "_posted", []):
            req.wait()
        self._posted = []
        detail = "; ".join(f"process {i}: {msgs[i]}" for i in failed)
        raise RankFailure(f"{len(failed)} of {self.size} processes failed - {detail}")

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.c.Abort(code)

    # --------------------------------------------------------- collectives
    def barrier(self) -> None:
        self.c.Barrier()

    def bcast(self, obj, root: int = 0):
        return self.c.bcast(obj, root=root)

    def gather(self, obj, root: int = 0):
        return self.c.gather(obj, root=root)

    def allgather(self, obj):
        return self.c.allgather(obj)

    def allreduce_array(self, a: np.ndarray) -> np.ndarray:
        """Elementwise sum over processes of a contiguous numpy buffer (no pickling)."""
        a = np.ascontiguousarray(a)
        if self.size == 1:
            return a.copy()
        out = np.empty_like(a)
        self.c.Allreduce(a, out, op=self.MPI.SUM)
        return out

    def allreduce_inplace(self, a: np.ndarray) -> None:
        """Elementwise sum over processes, written over a (contiguous, writeable) buffer."""
        if self.size > 1:
            self.c.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)

    def max(self, x: float) -> float:
        return self.c.allreduce(x, op=self.MPI.MAX)

    def sum(self, x):
        return self.c.allreduce(x, op=self.MPI.SUM)

    def library_version(self) -> str:
        return self.MPI.Get_library_version().strip().splitlines()[0]


def default_threads(comm: Comm) -> int:
    """Cores on this host shared evenly among the processes on it (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // comm.local_size)
