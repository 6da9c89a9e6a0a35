"""Which code computed a record's numbers, so a stored run is reused only if today's code would
compute the same thing.

A config hash says *what* was asked; ``VERSION`` says *which arithmetic* answered. Any change to
the modules in ``SOURCES`` (the step, the model, the data path, the sync strategies) must either
bump ``VERSION`` (numbers change: say which syncs in ``CHANGES``) or, when the numbers provably do
not change (a comment, error handling; shown by equal final weight digests of the old and the new
code), move the old ``SOURCES_SHA`` into ``SAME_NUMBERS_AS`` and set the new one, so the records the
old code made are still reused. ``tests/test_numerics.py`` fails until one is done.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

VERSION = 2
# version -> the sync strategies whose numbers that version changed (None: all of them).
CHANGES: dict[int, set[str] | None] = {
    1: None,  # the first recorded code
    2: {"allreduce"},  # f0d0e88: fused allreduce step, loss pre-scaled by 1/global batch
}
SOURCES = ("model.py", "worker.py", "sync.py", "data.py", "comm.py", "fused_adam.py", "ops/fused_adam.cc",
           "opbuild.py", "mpi_op.py", "ops/mpi_allreduce.cc", "ops/adam_update.h")
SOURCES_SHA = "e853ae5e22993c3a"
# Earlier SOURCES_SHA values under this VERSION whose code computed the same numbers (declared when
# the sources changed without changing the arithmetic, checked by comparing final weight digests).
SAME_NUMBERS_AS: tuple[str, ...] = (
    "7818e4b2d35c8b83",
    "56e3f29af87e251d",  # before the fused Adam kernel and lean loading: same final weight digests
    "6562da49dde296fa",  # before one Adam op for all variables and the in-graph Allreduce: same digests
    "05fc9f6f757d4586",  # before the steps were called as concrete functions: same digests
    "4488b53d7ddf784b",  # before a blank line in mpi_op.py (no code changed)
    "5a5a953c7031f68a",  # before Comm.waiting replaced _wait (checkpoint path, not the arithmetic)
    "ff828047f6775493",  # before several steps per graph call (a loop in the graph): same digests, 12 configs
    "4265ba7148cb4fd8",  # before steps_per_call moved to config.py (no arithmetic changed): same digests
    "f60d5468422eea57",  # before Adam was sharded over two processes in the synchronous step: same digests, 12 configs
    "963cfa7a9c69dfe8",  # before the sharded step sent one message per variable piece: same digests, 12 configs
    "4e64756b10613eb7",  # before the weight and state exchanges shared post_shares (a refactor): same digests
    "7020f9f9194fbb5a",  # before data.py searched the project's data/ (paths only); before kernels agreed by
                         # every process, the ops' own communicator, x86-only clones and the chunked dead-ReLU
                         # probe: same digests (allreduce, epoch-average; np 4 on 2 processes); before comm.py's
                         # watchdog named the processes that did not arrive: same digests, 4 configs (epoch-average
                         # N=4, allreduce N=2 and N=4, local-sgd H=5 allreduce-average; P=2)
    "a8ce171395d34ccc",  # the project-anchored data search alone (no arithmetic)
    "31f0b48c83babc07",  # before ops_comm re-made a duplicate whose handle another group reused (no arithmetic)
    "b5346f4f1d36997c",  # before the evaluation's forward pass ran in chunks of 100: per-sample values and the
                         # per-batch float32 sums are the same bits (test loss, accuracy equal on 5,000 rows)
    "4355239d7e16ef22",  # issue 27's branch before it was merged with the data search (no arithmetic)
    "6f5051ac39e00a94",  # issues 25 and 27 merged, before issue 28's watchdog (no arithmetic)
    "db36f5c408767472",  # issue 28's branch alone (no arithmetic)
)


def same_numbers() -> set[str]:
    """Source fingerprints whose records today's code reproduces (same VERSION)."""
    return {SOURCES_SHA, *SAME_NUMBERS_AS}


def sources_sha() -> str:
    """sha256 over the numerics modules' source, in a fixed order."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def is_current(version: int | None, sync: str) -> bool:
    """Would today's code compute the same numbers as code of `version` did for this sync strategy?"""
    if version is None:
        return False
    return all(changed is not None and sync not in changed
               for v, changed in CHANGES.items() if version < v <= VERSION)
