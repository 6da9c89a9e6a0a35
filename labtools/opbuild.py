"""Compile a TensorFlow custom op (``labtools/ops/*.cc``) on first use, into a per-user cache.

Ops are built with the C++ compiler and TensorFlow's own flags, without FMA contraction or
fast-math (which would change last bits), keyed by source, TensorFlow version, machine, compiler
and flags, under a file lock (ranks start together and would otherwise build the same file at once).
"""
from __future__ import annotations

import fcntl
import hashlib
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


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labtools" / "ops"


def build(name: str, cflags: list[str] = (), ldflags: list[str] = ()) -> Path:
    """The compiled ``ops/<name>.cc``'s path, building it once per cache key."""
    source = OPS / f"{name}.cc"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++/c++ on PATH, or $CXX)")
    compile_flags = FLAGS + list(cflags) + tf.sysconfig.get_compile_flags()
    link_flags = tf.sysconfig.get_link_flags() + list(ldflags)
    headers = [h.read_bytes() for h in sorted(OPS.glob("*.h"))]  # included by the sources
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, tf.__version__.encode(), platform.machine().encode(),
                                     " ".join(compile_flags + link_flags).encode(), cxx.encode()])).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():  # another process built it while we waited
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        r = subprocess.run([cxx, *compile_flags, str(source), "-o", tmp, *link_flags], capture_output=True, text=True)
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    return out


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
