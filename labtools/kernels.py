"""Which compiled kernels a job uses: every process says which it can load, all use the common subset.

The fused Adam kernel and the in-graph MPI op are built per node (labtools.opbuild); a node without
a compiler, with another TensorFlow or with ``LABTOOLS_FUSED_ADAM=0`` / ``LABTOOLS_MPI_OP=0`` set
only there lacks them. One process on the sharded point-to-point step and another in MPI_Allreduce
would wait for each other until ``--wait-limit``: so at start the processes exchange what they can
load (one allgather) and a kernel is used only if every process has it. The fallbacks compute the
same numbers, so the choice changes speed only. The manifest records every process's set.
"""
from __future__ import annotations

import sys

# kernel -> (what the job does with it, what it does without it)
NAMES = {"fused_adam": ("fused kernel", "keras apply"), "mpi_op": ("in-graph op", "mpi4py via numpy_function")}


def wanted(cfg, processes: int) -> list[str]:
    """The kernels this configuration would use."""
    out = ["fused_adam"] if cfg.optimizer == "adam" else []
    if processes > 1 and cfg.sync == "allreduce":
        out.append("mpi_op")
    return out


def local(names) -> dict[str, str | None]:
    """{kernel: None if this process loads it, else why not}; builds on first use."""
    from . import fused_adam, mpi_op

    out = {}
    for n in names:
        lazy = fused_adam._lazy if n == "fused_adam" else mpi_op._lazy
        out[n] = None if lazy.get() is not None else (lazy.why_not or "not available")
    return out


class Agreement:
    """``use[k]``: does the job use kernel k (every process can); ``processes``: each process's host
    and {kernel: what it could run}, for the manifest."""

    def __init__(self, names: list[str], every: list[dict]):
        self.use = {n: all(p["kernels"][n] is None for p in every) for n in names}
        self.processes = [{"process": i, "host": p["host"],
                           **{n: NAMES[n][0] if why is None else f"{NAMES[n][1]} ({why})" for n, why in p["kernels"].items()}}
                          for i, p in enumerate(every)]
        self.missing = {n: [(i, p["host"], p["kernels"][n]) for i, p in enumerate(every) if p["kernels"][n] is not None]
                        for n in names}

    def reason(self, name: str) -> str:
        """What the job uses for this kernel, and why when it falls back."""
        if self.use.get(name):
            return NAMES[name][0]
        lacking = self.missing.get(name)
        if not lacking:
            return f"{NAMES[name][1]} (not used by this configuration)"
        i, host, why = lacking[0]
        more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
        return f"{NAMES[name][1]} (process {i} on {host}{more}: {why})"


def agree(comm, cfg) -> Agreement:
    """Collective over ``comm``: the kernels every process can load. Said once, on the root, when a
    kernel some processes have is off because others lack it."""
    names = wanted(cfg, comm.size)
    every = comm.allgather({"host": comm.host, "kernels": local(names)})
    a = Agreement(names, every)
    for n in names:
        if not a.use[n] and len(a.missing[n]) < comm.size and comm.is_root:
            print(f"labtools: {NAMES[n][0]} off on every process, because not every process has it: "
                  f"{a.reason(n)}; the same numbers, slower.", file=sys.stderr, flush=True)
    return a


# ---------------------------------------------------------------------- `labtools kernels build | check`

def _paths(compile_missing: bool, retry: bool):
    """{kernel: (library path or None, why not)} on this node, for the MPI mpi4py loads here."""
    from . import mpi_op, opbuild

    out = {}
    for name, get in (("fused_adam", lambda: opbuild.build("fused_adam", retry=retry, compile_missing=compile_missing)),
                      ("mpi_op", lambda: mpi_op.library_path(compile_missing=compile_missing, retry=retry))):
        try:
            out[name] = (get(), None)
        except Exception as e:  # noqa: BLE001 - reported per kernel
            out[name] = (None, f"{type(e).__name__}: {e}")
    return out


def build_all() -> int:
    """Build (again, failures included) every kernel into the cache; 0 if all built."""
    from . import opbuild

    print(f"kernel cache: {opbuild.cache_dir()}")
    bad = 0
    for name, (path, why) in _paths(compile_missing=True, retry=True).items():
        print(f"{name}: {'built ' + str(path) if path else 'FAILED ' + why}")
        bad += path is None
    return 1 if bad else 0


def check_all() -> int:
    """Report what loads on this node, compiling nothing; 0 if every kernel loads."""
    import tensorflow as tf
    from mpi4py import MPI

    from . import mpi_op, opbuild

    print(f"kernel cache: {opbuild.cache_dir()}")
    print(f"MPI: {MPI.Get_library_version().strip().splitlines()[0]} (thread level {MPI.Query_thread()})")
    bad = 0
    for name, (path, why) in _paths(compile_missing=False, retry=False).items():
        if path is not None:
            try:
                if name == "mpi_op":
                    mpi_op.check_thread_level()
                tf.load_op_library(str(path))
            except Exception as e:  # noqa: BLE001
                path, why = None, f"{type(e).__name__}: {e}"
        print(f"{name}: {'loads ' + str(path) if path else 'does not load: ' + why}")
        bad += path is None
    return 1 if bad else 0
