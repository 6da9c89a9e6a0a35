"""The gradient Allreduce as a TensorFlow op (``ops/mpi_allreduce.cc``), built against the MPI that
mpi4py loaded in this process.

The op is compiled (``labtools.opbuild``) with that library's ``mpi.h`` and linked to the very file
mpi4py mapped, so the op and mpi4py share one MPI. It runs in the graph, on the graph's buffer,
without a trip through Python. When it cannot be built (no compiler, no ``mpi.h`` beside the
library, a system without ``/proc``), or with ``LABTOOLS_MPI_OP=0``, labtools reduces through
``tf.numpy_function`` and mpi4py instead: the same MPI call on the same buffer, so the same numbers.

The same library holds the sharded synchronous Adam step used at two processes
(``LabtoolsShardedAdam``, ``LabtoolsShardGather``; ``labtools.worker``): each process sums and
updates its half of the parameters and sends the other its half of the new weights, straight from
and into the variables. ``LABTOOLS_SHARDED_ADAM=0`` turns it off; the numbers are the same.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import opbuild


def _loaded_libmpi() -> Path:
    """The MPI library file mpi4py mapped into this process."""
    from mpi4py import MPI  # noqa: F401 - maps libmpi

    maps = Path("/proc/self/maps")
    if not maps.exists():
        raise RuntimeError("no /proc/self/maps to find the MPI library mpi4py loaded")
    libs = sorted({f for f in (line.split()[-1] for line in maps.read_text().splitlines() if line.strip())
                   if re.search(r"/libmpi\.so(\.\d+)*$", f)})
    if not libs:
        raise RuntimeError("mpi4py's MPI library (libmpi.so*) is not mapped in this process")
    return Path(libs[0])


def _include_dir(lib: Path) -> Path:
    """mpi.h of that library: its prefix's include/, else what the mpicc beside Python names."""
    for d in (lib.parent.parent / "include", lib.parent.parent / "include" / "mpich"):
        if (d / "mpi.h").exists():
            return d
    mpicc = Path(sys.executable).parent / "mpicc"
    mpicc = str(mpicc) if mpicc.exists() else shutil.which("mpicc")
    if mpicc:
        for args in (["-show"], ["-showme:compile"]):
            r = subprocess.run([mpicc, *args], capture_output=True, text=True)
            for flag in r.stdout.split():
                if flag.startswith("-I") and (Path(flag[2:]) / "mpi.h").exists():
                    return Path(flag[2:])
    raise RuntimeError(f"no mpi.h for {lib} (looked in its prefix's include/ and asked mpicc)")


def _load():
    lib = _loaded_libmpi()
    path = opbuild.build("mpi_allreduce", [f"-I{_include_dir(lib)}"], [str(lib), f"-Wl,-rpath,{lib.parent}"])
    return tf.load_op_library(str(path))


_lazy = opbuild.LazyOp("the in-graph Allreduce", "LABTOOLS_MPI_OP", "reducing through mpi4py", _load)


def allreduce_op():
    """The op, or None (then ``reason()`` says why)."""
    lib = _lazy.get()
    return None if lib is None else lib.labtools_allreduce


def sharded_ops():
    """(sharded Adam step, shard gather) from the same library (``ops/mpi_allreduce.cc``), or None."""
    lib = _lazy.get()
    return None if lib is None else (lib.labtools_sharded_adam, lib.labtools_shard_gather)


def reason() -> str:
    return "in-graph op" if _lazy.get() is not None else f"mpi4py via numpy_function ({_lazy.why_not})"


SHARD_GRAD_TAG = 7303  # LabtoolsShardedAdam's gradient messages (ops/mpi_allreduce.cc: kGradTag)


def _pieces(sizes: list[int], lo: int, hi: int) -> list[int]:
    """Sizes of the pieces of the variables (laid end to end) in [lo, hi): the op's spans_in."""
    out, off = [], 0
    for n in sizes:
        a, e = max(lo, off), min(hi, off + n)
        if a < e:
            out.append(e - a)
        off += n
    return out


def fail_sharded_step(c, sizes: list[int]) -> None:
    """A process that failed joins its peers' LabtoolsShardedAdam step as phase 1 would: the same
    messages (one per variable piece of each peer's share, then the flag), its gradients zero and its
    failure flag set; the peers then fail the step with PEER_MARK instead of waiting. ``c``: the mpi4py
    communicator whose handle the op was given; ``sizes``: the variables' sizes, in order."""
    from mpi4py import MPI

    P, me, total = c.Get_size(), c.Get_rank(), sum(sizes)
    share = [total * q // P for q in range(P + 1)]  # the op's shares (n * q / P in int64)
    keep, reqs = [], []
    for q in range(P):
        if q == me:
            continue
        for n in _pieces(sizes, share[me], share[me + 1]) + [1]:  # our share of q's gradients, q's flag
            keep.append(np.empty(n, np.float32))
            reqs.append(c.Irecv(keep[-1], source=q, tag=SHARD_GRAD_TAG))
        for n in _pieces(sizes, share[q], share[q + 1]):  # q's share of ours
            keep.append(np.zeros(n, np.float32))
            reqs.append(c.Isend(keep[-1], dest=q, tag=SHARD_GRAD_TAG))
        keep.append(np.ones(1, np.float32))  # our flag
        reqs.append(c.Isend(keep[-1], dest=q, tag=SHARD_GRAD_TAG))
    MPI.Request.Waitall(reqs)
