"""Keras Adam's update as one fused kernel per variable, bit-identical to ``optimizer.apply``.

Keras 3 updates each variable with about a dozen TensorFlow ops, each a pass over the variable:
for SqueezeNet at batch 12 that is a third of the step. ``ops/fused_adam.cc`` does the same float32
arithmetic in the same order in one pass, on Keras's own slot variables (so checkpoints, rank
swaps and ``opt_state=average`` see the same state), and can read the gradient from one flat
buffer at an offset (the Allreduce's, without splitting it).

The kernel is compiled on first use with the C++ compiler and TensorFlow's headers, without FMA
contraction or fast-math (which would change the last bits), into a per-user cache keyed by
source, TensorFlow version, machine and compiler flags. Without a compiler, or with
``LABTOOLS_FUSED_ADAM=0``, ``update`` falls back to Keras's own ``apply``: the numbers are the same
either way; only the speed differs. ``tests/test_fused_adam.py`` checks the bits.
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

import numpy as np
import tensorflow as tf

SOURCE = Path(__file__).parent / "ops" / "fused_adam.cc"
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno",
         "-fopenmp-simd"]
_op = None
_why_not = None  # why the fused kernel is not used (None: not tried yet, or in use)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labtools" / "ops"


def _build() -> Path:
    """The compiled kernel's path, building it once per cache key (under a lock: ranks start together)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++/c++ on PATH, or $CXX)")
    cmd_flags = FLAGS + tf.sysconfig.get_compile_flags()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), tf.__version__.encode(), platform.machine().encode(),
                                     " ".join(cmd_flags).encode(), cxx.encode()])).hexdigest()[:16]
    out = _cache_dir() / f"fused_adam-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():  # another process built it while we waited
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        r = subprocess.run([cxx, *cmd_flags, str(SOURCE), "-o", tmp, *tf.sysconfig.get_link_flags()],
                           capture_output=True, text=True)
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    return out


def kernel():
    """The fused op, or None (then ``reason()`` says why)."""
    global _op, _why_not
    if _op is None and _why_not is None:
        if os.environ.get("LABTOOLS_FUSED_ADAM", "1") == "0":
            _why_not = "turned off by LABTOOLS_FUSED_ADAM=0"
        else:
            try:
                _op = tf.load_op_library(str(_build())).labtools_adam_update
            except Exception as e:  # any failure: Keras's apply computes the same numbers
                _why_not = f"{type(e).__name__}: {e}"
                print(f"labtools: the fused Adam kernel is not available ({_why_not}); using Keras's "
                      "Adam (same numbers, slower).", file=sys.stderr)
    return _op


def reason() -> str:
    return "fused kernel" if kernel() is not None else f"keras apply ({_why_not})"


class FusedAdam:
    """``update(grads)`` == ``opt.apply(grads, tvars)`` for a built ``keras.optimizers.Adam``, in fewer
    passes. ``grads``: a list of per-variable tensors, or one flat tensor holding them in order.
    Returns the gradient's global L2 norm. Call inside a tf.function."""

    def __init__(self, opt, tvars):
        if opt.amsgrad or opt.weight_decay or opt.clipnorm or opt.clipvalue or opt.global_clipnorm or opt.use_ema:
            raise ValueError("FusedAdam covers plain Adam only (no amsgrad, weight decay, clipping or EMA)")
        self.opt, self.tvars = opt, list(tvars)
        self.slots = [(opt._momentums[opt._get_variable_index(v)], opt._velocities[opt._get_variable_index(v)])
                      for v in self.tvars]
        sizes = [int(np.prod(v.shape)) for v in self.tvars]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        # Keras multiplies by (1 - beta) written in Python; as float32 constants these are the same values.
        self.c1, self.c2, self.eps = (np.float32(1 - opt.beta_1), np.float32(1 - opt.beta_2), np.float32(opt.epsilon))
        self.op = kernel()

    def update(self, grads):
        opt, flat = self.opt, not isinstance(grads, (list, tuple))
        if self.op is None:
            parts = tf.split(grads, [int(np.prod(v.shape)) for v in self.tvars]) if flat else grads
            parts = [tf.reshape(g, v.shape) for g, v in zip(parts, self.tvars)]
            opt.apply(parts, self.tvars)
            return tf.linalg.global_norm(parts)
        # alpha exactly as Keras's Adam.update_step computes it (same ops, same float32 order)
        lr = tf.cast(opt.learning_rate, tf.float32)
        step = tf.cast(opt.iterations + 1, tf.float32)
        b1p = tf.pow(tf.cast(opt.beta_1, tf.float32), step)
        b2p = tf.pow(tf.cast(opt.beta_2, tf.float32), step)
        alpha = lr * tf.sqrt(1 - b2p) / (1 - b1p)
        sq = []
        for i, (v, (m, vel)) in enumerate(zip(self.tvars, self.slots)):
            g = grads if flat else grads[i]
            sq.append(self.op(v.value.handle, m.value.handle, vel.value.handle, g,
                              self.offsets[i] if flat else np.int64(0), alpha, self.c1, self.c2, self.eps))
        with tf.control_dependencies(sq):
            opt.iterations.assign_add(1)
        return tf.sqrt(tf.add_n(sq))
