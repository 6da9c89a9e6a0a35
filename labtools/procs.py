"""labtools.procs: find the live processes of an ipyparallel engine pool."""
from __future__ import annotations

import os

import psutil

ENGINE_PARTS = ("ipengine", "ipyparallel.engine")
CLUSTER_PARTS = (*ENGINE_PARTS, "ipcontroller", "ipyparallel.controller", "mpiexec", "hydra_pmi_proxy")


def find(cluster_id: str | None = None, under: int | psutil.Process | None = None,
         parts: tuple[str, ...] | None = CLUSTER_PARTS) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line contains one of ``parts`` (None: any command)
    and that carry ``cluster_id`` (ipyparallel sets $IPP_CLUSTER_ID in everything it launches; the
    controller also has it on its command line) or run below the process ``under`` (a pid).
    Without cluster_id and under: every such process on this machine. Never this process."""
    cands: dict[int, psutil.Process] = {}
    if under is not None:
        root = under if isinstance(under, psutil.Process) else psutil.Process(under)
        cands.update((p.pid, p) for p in root.children(recursive=True))
    if cluster_id or under is None:
        for p in psutil.process_iter():
            try:
                if p.pid not in cands and (not cluster_id or p.environ().get("IPP_CLUSTER_ID") == cluster_id
                                           or cluster_id in " ".join(p.cmdline())):
                    cands[p.pid] = p
            except psutil.Error:
                pass
    found = []
    for p in cands.values():
        try:
            cmd = " ".join(p.cmdline()) or p.name()
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and \
                    (parts is None or any(k in cmd for k in parts)):
                found.append(p)
        except psutil.Error:
            pass
    return found


def kill(procs: list[psutil.Process], timeout: float = 5) -> None:
    """SIGKILL the processes and wait (up to timeout) until they are gone."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)
