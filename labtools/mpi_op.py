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


def _family(text: str) -> str | None:
    """"openmpi" or "mpich" from MPI_Get_library_version's text or an mpi.h."""
    if "Open MPI" in text or "OPEN_MPI" in text:
        return "openmpi"
    if "MPICH" in text:
        return "mpich"
    return None


def _include_dir(lib: Path) -> Path:
    """mpi.h of that library (the same MPI family as the library mpi4py runs): its prefix's include/,
    Debian's layouts, else what the mpicc beside Python or on PATH names."""
    from mpi4py import MPI

    family = _family(MPI.Get_library_version())
    multiarch = lib.parent.name  # e.g. x86_64-linux-gnu under /usr/lib
    candidates = [lib.parent.parent / "include", lib.parent.parent / "include" / "mpich", lib.parent / "openmpi" / "include",
                  lib.parent.parent.parent / "include" / multiarch / "mpich", lib.parent.parent.parent / "include" / "mpich"]
    mpiccs = [Path(sys.executable).parent / "mpicc", *filter(None, (shutil.which(n) for n in (
        "mpicc", "mpicc.openmpi" if family == "openmpi" else "mpicc.mpich")))]
    for mpicc in mpiccs:
        if not Path(mpicc).exists():
            continue
        for args in (["-show"], ["-showme:compile"]):
            r = subprocess.run([str(mpicc), *args], capture_output=True, text=True)
            candidates += [Path(f[2:]) for f in r.stdout.split() if f.startswith("-I")]
    for d in candidates:
        h = d / "mpi.h"
        if h.exists() and (family is None or _family(h.read_text(errors="replace")) in (family, None)):
            return d
    raise RuntimeError(f"no mpi.h of {family or 'this MPI'} for {lib} (looked in its prefix's include/, Debian's "
                       "layouts and asked mpicc)")


NEEDED_THREAD_LEVEL = "MPI_THREAD_SERIALIZED"  # the ops call MPI from TensorFlow's threads, one at a time


def check_thread_level() -> None:
    """Raise unless MPI was initialised with the thread level the ops need (mpi4py asks for MULTIPLE;
    an MPI or an MPI4PY_RC_THREAD_LEVEL may give less)."""
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise RuntimeError(f"MPI gives thread level {MPI.Query_thread()}; the in-graph op needs {NEEDED_THREAD_LEVEL}")


def library_path(compile_missing: bool = True, retry: bool = False) -> Path:
    """The op library built against the MPI mpi4py loaded (built once per cache key; opbuild)."""
    lib = _loaded_libmpi()
    return opbuild.build("mpi_allreduce", [f"-I{_include_dir(lib)}"], [str(lib), f"-Wl,-rpath,{lib.parent}"],
                         retry=retry, compile_missing=compile_missing)


def _load():
    check_thread_level()
    return tf.load_op_library(str(library_path()))


_lazy = opbuild.LazyOp("the in-graph Allreduce", "LABTOOLS_MPI_OP", "reducing through mpi4py", _load)


def available() -> tuple[bool, str]:
    """(can this process run the op, the reason) without changing what the job uses."""
    return _lazy.get() is not None, "in-graph op" if _lazy.get() is not None else f"mpi4py ({_lazy.why_not})"


_dups: dict = {}


def ops_comm(comm):
    """A duplicate of the mpi4py communicator ``comm`` for the ops' messages (one per communicator and
    process, made once: Dup is collective, and a pool's engines run many jobs on one COMM_WORLD), so
    their tags never match a message of labtools.comm's."""
    from mpi4py import MPI

    key = comm.py2f()
    dup = _dups.get(key)
    if dup is None or MPI.Comm.Compare(dup, comm) != MPI.CONGRUENT:  # a handle reused by another group
        dup = _dups[key] = comm.Dup()
    return dup


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
