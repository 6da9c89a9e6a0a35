"""Compile a TensorFlow custom op (``labtools/ops/*.cc``) on first use, into a cache.

Ops are built with the C++ compiler and TensorFlow's own flags, without FMA contraction or
fast-math (which would change last bits), keyed by source, TensorFlow version, machine and flags,
under a file lock (ranks start together and would otherwise build the same file at once).

Both outcomes are cached: a built library is found by its key alone (so a node without a compiler
loads what a login node of the same architecture built into a shared ``$LABTOOLS_KERNEL_CACHE``:
``labtools kernels build``), and a failed build leaves a note keyed by the same key and the
compiler, so the next start says why at once instead of compiling and failing again.
``labtools kernels build`` ignores the notes and tries again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tensorflow as tf

OPS = Path(__file__).parent / "ops"
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno",
         "-fopenmp-simd"]
ENV_CACHE = "LABTOOLS_KERNEL_CACHE"


class BuildFailed(RuntimeError):
    pass


def cache_dir() -> Path:
    """``$LABTOOLS_KERNEL_CACHE``, else the per-user cache (``$XDG_CACHE_HOME/labtools/ops``)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labtools" / "ops"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def command(name: str, cflags=(), ldflags=(), cxx: str | None = None) -> tuple[list[str], Path]:
    """(the compile command without its output file, the cached library's path)."""
    source = OPS / f"{name}.cc"
    compile_flags = FLAGS + list(cflags) + tf.sysconfig.get_compile_flags()
    link_flags = tf.sysconfig.get_link_flags() + list(ldflags)
    headers = [h.read_bytes() for h in sorted(OPS.glob("*.h"))]  # included by the sources
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, tf.__version__.encode(), platform.machine().encode(),
                                     " ".join(compile_flags + link_flags).encode()])).hexdigest()[:16]
    return [cxx or "c++", *compile_flags, str(source), *link_flags], cache_dir() / f"{name}-{key}.so"


def _failure_note(out: Path, cxx: str | None) -> Path:
    tag = hashlib.sha256((cxx or "no compiler").encode() + platform.node().encode()).hexdigest()[:8]
    return out.with_name(f"{out.stem}.{tag}.failed.json")


def build(name: str, cflags: list[str] = (), ldflags: list[str] = (), retry: bool = False,
          compile_missing: bool = True) -> Path:
    """The compiled ``ops/<name>.cc``'s path, building it once per cache key. A failure (no compiler,
    a compile error) raises BuildFailed, and later calls raise it again from the note without
    compiling, unless ``retry``; ``compile_missing=False`` only looks the library up."""
    cxx = compiler()
    cmd, out = command(name, cflags, ldflags, cxx)
    if out.exists():
        return out
    note = _failure_note(out, cxx)
    if not retry and note.exists():
        try:
            why = json.loads(note.read_text())["error"]
        except (OSError, ValueError, KeyError):
            why = "unreadable note"
        raise BuildFailed(f"{why} (cached in {note.name}; `labtools kernels build` tries again)")
    if not compile_missing:
        raise BuildFailed(f"not built ({out} is missing; `labtools kernels build` builds it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():  # another process built it while we waited
            return out
        if not cxx:
            error = "no C++ compiler (g++/c++ on PATH, or $CXX)"
        else:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            r = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
            if not r.returncode:
                os.replace(tmp, out)
                note.unlink(missing_ok=True)
                return out
            os.unlink(tmp)
            error = f"{cxx} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}"
        note.write_text(json.dumps({"error": error, "compiler": cxx, "host": platform.node(),
                                    "machine": platform.machine(), "tensorflow": tf.__version__}))
    raise BuildFailed(error)


class LazyOp:
    """An op loaded on first use, or None with the reason why not. ``load()`` returns the op; any
    failure (no compiler, no headers) leaves None and one line on stderr, and the caller's fallback
    computes the same numbers. ``env=0`` turns the op off."""

    def __init__(self, what: str, env: str, fallback: str, load):
        self.what, self.env, self.fallback, self._load = what, env, fallback, load
        self.op = None
        self.why_not: str | None = None  # None: not tried yet, or in use

    def get(self):
        if self.op is None and self.why_not is None:
            if os.environ.get(self.env, "1") == "0":
                self.why_not = f"turned off by {self.env}=0"
            else:
                try:
                    self.op = self._load()
                except Exception as e:  # noqa: BLE001 - any failure: the fallback gives the same numbers
                    self.why_not = f"{type(e).__name__}: {e}"
                    print(f"labtools: {self.what} is not available ({self.why_not}); {self.fallback} (same numbers, "
                          "slower).", file=sys.stderr)
        return self.op
