"""Keras Adam's update as one fused kernel for all variables, bit-identical to ``optimizer.apply``.

Keras 3 updates each variable with about a dozen TensorFlow ops, each a pass over the variable:
for SqueezeNet at batch 12 that is a third of the step. ``ops/fused_adam.cc`` does the same float32
arithmetic in the same order in one pass per variable, all variables in one op (vectorised for
the CPU's widest lanes), on Keras's own slot variables (so checkpoints, rank
swaps and ``opt_state=average`` see the same state), and can read the gradient from one flat
buffer at an offset (the Allreduce's, without splitting it).

The kernel is compiled on first use (``labtools.opbuild``). Without a compiler, or with
``LABTOOLS_FUSED_ADAM=0``, ``update`` falls back to Keras's own ``apply``: the numbers are the same
either way; only the speed differs. ``tests/test_fused_adam.py`` checks the bits.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import opbuild

_lazy = opbuild.LazyOp("the fused Adam kernel", "LABTOOLS_FUSED_ADAM", "using Keras's Adam",
                       lambda: tf.load_op_library(str(opbuild.build("fused_adam"))).labtools_adam_update)


def kernel():
    """The fused op, or None (then ``reason()`` says why)."""
    return _lazy.get()


def reason() -> str:
    return "fused kernel" if kernel() is not None else f"keras apply ({_lazy.why_not})"


class FusedAdam:
    """``update(grads)`` == ``opt.apply(grads, tvars)`` for a built ``keras.optimizers.Adam``, in fewer
    passes. ``grads``: a list of per-variable tensors, or one flat tensor holding them in order.
    Returns the gradient's global L2 norm. Call inside a tf.function."""

    def __init__(self, opt, tvars, use_kernel: bool = True):
        if opt.amsgrad or opt.weight_decay or opt.clipnorm or opt.clipvalue or opt.global_clipnorm or opt.use_ema:
            raise ValueError("FusedAdam covers plain Adam only (no amsgrad, weight decay, clipping or EMA)")
        self.opt, self.tvars = opt, list(tvars)
        self.slots = [(opt._momentums[opt._get_variable_index(v)], opt._velocities[opt._get_variable_index(v)])
                      for v in self.tvars]
        # Keras multiplies by (1 - beta) written in Python; as float32 constants these are the same values.
        self.c1, self.c2, self.eps = (np.float32(1 - opt.beta_1), np.float32(1 - opt.beta_2), np.float32(opt.epsilon))
        self.op = kernel() if use_kernel else None  # use_kernel=False: every process agreed on Keras's apply

    def update(self, grads):
        flat = not isinstance(grads, (list, tuple))
        if self.op is None:
            parts = tf.split(grads, [int(np.prod(v.shape)) for v in self.tvars]) if flat else grads
            parts = [tf.reshape(g, v.shape) for g, v in zip(parts, self.tvars)]
            self.opt.apply(parts, self.tvars)
            return tf.linalg.global_norm(parts)
        sq = self.op(*self._handles(), [grads] if flat else list(grads), self._alpha(), self.c1, self.c2, self.eps)
        return self._step_done(sq)

    def sharded_update(self, grads, op, comm_f):
        """The synchronous step's update with Adam sharded over the processes (``ops/mpi_allreduce.cc``,
        LabtoolsShardedAdam): ``grads`` are this process's per-variable gradients (already scaled so
        that their sum over processes is the mean); returns the global norm of that sum."""
        return self._step_done(op(*self._handles(), list(grads), self._alpha(), self.c1, self.c2, self.eps, comm_f))

    def _handles(self):
        slots = list(zip(*self.slots))
        return ([v.value.handle for v in self.tvars], [m.value.handle for m in slots[0]],
                [v.value.handle for v in slots[1]])

    def _alpha(self):
        # alpha exactly as Keras's Adam.update_step computes it (same ops, same float32 order)
        opt = self.opt
        lr = tf.cast(opt.learning_rate, tf.float32)
        step = tf.cast(opt.iterations + 1, tf.float32)
        b1p = tf.pow(tf.cast(opt.beta_1, tf.float32), step)
        b2p = tf.pow(tf.cast(opt.beta_2, tf.float32), step)
        return lr * tf.sqrt(1 - b2p) / (1 - b1p)

    def _step_done(self, sq):
        with tf.control_dependencies([sq]):
            self.opt.iterations.assign_add(1)
        return tf.sqrt(sq)
