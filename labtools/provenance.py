"""Facts that make a number traceable: git commit, package versions, host (and, for measurements, UTC time).

A table's or figure's sidecar names the identity of its inputs only (the code's commit, the versions,
the host, the run ids), never the time it was drawn: re-rendering unchanged inputs writes the same bytes.
"""
from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from .paths import project_root

PACKAGES = ("labtools", "tensorflow", "tensorflow-cpu", "keras", "numpy", "mpi4py", "mpich",
            "ipyparallel", "papermill", "pandas", "matplotlib", "psutil")


def portable_path(p) -> str:
    """A path as records should keep it: no machine-specific prefix.

    $CIFAR10_DIR stays a variable, paths under the project become relative, the home folder is '~'.
    """
    import os

    if p is None:
        return None
    path = Path(p).expanduser()
    env = os.environ.get("CIFAR10_DIR")
    if env and Path(env).expanduser().resolve() == path.resolve():
        return "$CIFAR10_DIR"
    # as written, then with links resolved: a project's data/ may be a link to a shared copy
    for cand in (Path(os.path.abspath(path)), path.resolve()):
        for base, name in ((project_root(), None), (Path.home(), "~")):
            for b in (Path(os.path.abspath(base)), base.resolve()):
                try:
                    rel = cand.relative_to(b)
                except ValueError:
                    continue
                return str(rel) if name is None else f"~/{rel}"
    return str(p)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """Commit of the labtools source tree (with '+dirty' when it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        # Only the code counts: results/ and figures/ change while runs are being recorded.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/labtools", ":/notebooks", ":/pyproject.toml"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_commit() -> str | None:
    """The last commit that changed the code (labtools/, notebooks/, pyproject.toml), '+dirty' when it has
    uncommitted changes: unlike HEAD, it stays put across commits of results, figures and prose."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "log", "-1", "--format=%H", "--", ":/labtools", ":/notebooks", ":/pyproject.toml"],
                             cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        head = git_commit()
        return (sha or None) and sha + ("+dirty" if head and head.endswith("+dirty") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def host() -> dict:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine()}


def sidecar(**extra) -> dict:
    """The provenance block written next to every table and figure: no clock time, so it changes only
    when an input does (a benchmark, which is a measurement, adds its own date_utc)."""
    return {"git_commit": code_commit(), "versions": versions(), "host": host(), **extra}
