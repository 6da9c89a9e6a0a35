"""One MPI process's share of the experiment: its logical ranks, the model and the step functions.

A process hosts k = N/P consecutive logical ranks. Each has its own strided shard, its own weights
between syncs and its own optimizer state, exactly as a real rank would. The Keras model holds the
state of one rank at a time; ``activate(r)`` swaps states (flat float32 vectors), which costs a
few milliseconds and happens once per rank per sync round. With k = 1 nothing is ever swapped.
"""
from __future__ import annotations

import math
import time

import keras
import numpy as np
import tensorflow as tf

from . import data as D
from . import kernels, mpi_op
from .comm import Comm
from .config import RunConfig, sharded_adam
from .fused_adam import FusedAdam
from .model import relu_probe, squeezenet_v1_1


class InjectedFailure(RuntimeError):
    pass


def _concrete(fn):
    """``fn``'s one graph (its input_signature), traced on first call and then run the way
    ``ConcreteFunction._call_flat`` runs it when no tape is watching: the arguments converted to the
    signature's dtypes, the captured variables appended, ``call_preflattened``. That skips the
    per-call argument binding, cache lookup and capture resolution of ``tf.function`` (1.1-1.3 ms of
    a 12 ms step here) and of ``ConcreteFunction.__call__`` (0.3-0.6 ms of a 7 ms step): the same
    graph, the same numbers. Without that TensorFlow internal, the concrete function is called."""
    run = None

    def call(*args):
        nonlocal run
        if run is None:
            run = _fast_path(fn)
        return run(*args)

    return call


def _fast_path(fn):
    cf = fn.get_concrete_function()
    atomic = getattr(cf, "_inference_function", None)
    try:
        from tensorflow.python.eager.record import could_possibly_record
    except ImportError:
        return cf
    if not hasattr(atomic, "call_preflattened"):
        return cf
    dtypes = [s.dtype for s in fn.input_signature]
    captures = list(cf.captured_inputs)  # variable handles: fixed for the function's life

    def run(*args):
        if tf.executing_eagerly() and not could_possibly_record():
            return atomic.call_preflattened([tf.convert_to_tensor(a, d) for a, d in zip(args, dtypes)] + captures)
        return cf(*args)  # under a tape or inside a graph: the full path records what it must

    return run


def _flat(vars_) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in vars_]) if vars_ else np.zeros(0, np.float32)


class Worker:
    def __init__(self, cfg: RunConfig, comm: Comm, world: int, xtr, ytr, xte, yte):
        self.cfg, self.comm = cfg, comm
        self.N, self.P = world, comm.size
        self.k = world // comm.size
        self.ranks = list(range(comm.rank * self.k, (comm.rank + 1) * self.k))
        self.b = cfg.batch_per_rank
        self.xtr, self.ytr, self.xte, self.yte = xtr, ytr, xte, yte
        self.shards = {r: D.shard_indices(len(ytr), world, r) for r in self.ranks}
        self.all_shard_sizes = np.array([len(D.shard_indices(len(ytr), world, r)) for r in range(world)])
        # Every process derives the same step count without talking: the largest shard decides.
        self.steps_per_epoch = math.ceil(math.ceil(len(ytr) / world) / self.b)
        # testing: "RANK:EPOCH" raises on that logical rank in that epoch, "RANK:EPOCH:hang" stops answering
        self.inject = cfg.inject_failure.split(":") if cfg.inject_failure else None

        keras.utils.set_random_seed(cfg.seed)
        self.model = squeezenet_v1_1(final_relu=cfg.final_relu, conv10_init=cfg.conv10_init,
                                     padding=cfg.padding, dropout=cfg.dropout, keyed_dropout=True)
        if cfg.optimizer == "adam":
            self.opt = keras.optimizers.Adam(learning_rate=cfg.lr)
        else:
            self.opt = keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum)
        self.tvars = list(self.model.trainable_variables)
        self.opt.build(self.tvars)
        lr_var = self.opt._learning_rate  # a Keras Variable when a float is given
        self.ovars = [v for v in self.opt.variables if v is not lr_var]
        self._lr_now = None
        self.shapes = [tuple(v.shape) for v in self.tvars]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.n_params = sum(self.sizes)
        # the kernels every process can load (collective): a process alone on another path would hang
        self.kernels = kernels.agree(comm, cfg)

        # Root's initial weights everywhere (§3.2.3: identical start on every rank).
        w0 = comm.bcast(_flat(self.tvars) if comm.is_root else None)
        self._assign(self.tvars, w0)
        o0 = _flat(self.ovars)
        self.states = {r: [w0.copy(), o0.copy()] for r in self.ranks}
        self.current = self.ranks[0]  # the model's variables hold this rank's state
        self._build_functions()
        self.probe = relu_probe(self.model) if cfg.diagnostics else None
        self._probe_idx = np.arange(min(256, len(ytr)))

    # ------------------------------------------------------------------ state
    @staticmethod
    def _assign(vars_, flat) -> None:
        o = 0
        for v in vars_:
            n = int(np.prod(v.shape))
            v.assign(flat[o:o + n].reshape(v.shape))
            o += n

    def activate(self, r: int) -> None:
        if r == self.current:
            return
        self.states[self.current] = [_flat(self.tvars), _flat(self.ovars)]
        self._assign(self.tvars, self.states[r][0])
        self._assign(self.ovars, self.states[r][1])
        self.current = r

    def flush(self) -> None:
        """Copy the model's variables back into the current rank's state."""
        self.states[self.current] = [_flat(self.tvars), _flat(self.ovars)]

    def share_current(self) -> None:
        """All local ranks take the model's state (synchronous SGD: they are one model)."""
        self.flush()
        w, o = self.states[self.current]
        for r in self.ranks:
            self.states[r] = [w.copy(), o.copy()]

    def set_all(self, w: np.ndarray | None = None, o: dict | None = None) -> None:
        """After a sync: every local rank gets weights w and (optionally) its new optimizer state."""
        for r in self.ranks:
            if w is not None:
                self.states[r][0] = w.copy()
            if o is not None:
                self.states[r][1] = o[r].copy()
        self._assign(self.tvars, self.states[self.current][0])
        self._assign(self.ovars, self.states[self.current][1])

    def local_states(self) -> dict[int, list[np.ndarray]]:
        """This process's ranks' (weights, optimizer state) for a checkpoint; equal arrays (ranks
        after a weight average) are sent as one object, so pickling sends them once."""
        self.flush()
        uniq: list[np.ndarray] = []

        def one(a):
            for u in uniq:
                if u.shape == a.shape and u.dtype == a.dtype and np.array_equal(u, a):
                    return u
            uniq.append(a)
            return a

        return {r: [one(a) for a in self.states[r]] for r in self.ranks}

    def restore(self, states: dict[int, list[np.ndarray]]) -> None:
        """Every local rank's state from a checkpoint; the model takes the current rank's."""
        for r in self.ranks:
            self.states[r] = [np.array(a, dtype=b.dtype) for a, b in zip(states[r], self.states[r])]
        self._assign(self.tvars, self.states[self.current][0])
        self._assign(self.ovars, self.states[self.current][1])

    # ------------------------------------------------------------------ lr
    def lr_at(self, epoch: int, step: int) -> float:
        c = self.cfg
        scale = {"none": 1.0, "linear": float(self.N), "sqrt": math.sqrt(self.N)}[c.lr_scaling]
        target = c.lr * scale
        t = epoch + step / self.steps_per_epoch
        if c.warmup_epochs > 0 and t < c.warmup_epochs:
            return c.lr + (target - c.lr) * t / c.warmup_epochs
        if c.lr_schedule == "cosine":
            span = max(c.epochs - c.warmup_epochs, 1e-9)
            return target * 0.5 * (1.0 + math.cos(math.pi * min((t - c.warmup_epochs) / span, 1.0)))
        return target

    def set_lr(self, epoch: int, step: int) -> None:
        lr = self.lr_at(epoch, step)
        if lr != self._lr_now:
            self.opt.learning_rate = lr
            self._lr_now = lr

    # ------------------------------------------------------------------ graphs
    def _build_functions(self) -> None:
        model, opt, tvars = self.model, self.opt, self.tvars
        use = self.kernels.use
        fused = FusedAdam(opt, tvars, use_kernel=use.get("fused_adam", False)) if self.cfg.optimizer == "adam" else None

        def update(grads):  # the optimizer step; returns the gradient's global norm
            if fused is not None:
                return fused.update(grads)
            opt.apply(grads, tvars)
            return tf.linalg.global_norm(grads)
        spec = (tf.TensorSpec([None, 32, 32, 3], tf.float32), tf.TensorSpec([None], tf.int64),
                tf.TensorSpec([None], tf.int64))

        def forward(x, y, k, training):
            p = model([x, k], training=training)
            per = keras.losses.sparse_categorical_crossentropy(y, p)
            correct = tf.cast(tf.equal(tf.argmax(p, axis=-1), y), tf.float32)
            return per, correct

        lr_var = opt._learning_rate  # a Keras Variable (the optimizer is always given a float)
        many = (tf.TensorSpec([None, None, 32, 32, 3], tf.float32), tf.TensorSpec([None, None], tf.int64),
                tf.TensorSpec([None, None], tf.int64), tf.TensorSpec([None], tf.float32))

        def steps(step, x, y, k, lrs, *per_step):
            # n optimizer steps in one call, a loop in the graph: step i sets the learning rate to
            # lrs[i] and trains on batch x[i]. The kernels and their order are those of n separate
            # calls (the same bits: tests/test_equivalence.py); one host<->graph crossing per n steps.
            n = tf.shape(x)[0]
            outs = [tf.TensorArray(tf.float32, size=n) for _ in range(3)]
            for i in tf.range(n):
                lr_var.assign(lrs[i])
                got = step(x[i], y[i], k[i], *[a[i] for a in per_step])
                outs = [o.write(i, g) for o, g in zip(outs, got)]
            return tuple(o.stack() for o in outs)

        def local_step(x, y, k):
            with tf.GradientTape() as tape:
                per, correct = forward(x, y, k, True)
                loss = tf.reduce_mean(per)
            grads = tape.gradient(loss, tvars)
            return tf.reduce_sum(per), tf.reduce_sum(correct), update(grads)

        @tf.function(input_signature=many, reduce_retracing=True)
        def local_steps(x, y, k, lrs):
            return steps(local_step, x, y, k, lrs)

        sizes, shapes = self.sizes, self.shapes
        mpi = mpi_op.allreduce_op() if use.get("mpi_op") else None
        # the ops' messages go on a duplicate of the job's communicator (never matching labtools.comm's)
        self._op_comm = mpi_op.ops_comm(self.comm.c) if mpi is not None else None
        comm_f = np.int64(self._op_comm.py2f()) if mpi is not None else None

        # Two processes: Adam sharded between them (ops/mpi_allreduce.cc, LabtoolsShardedAdam): each
        # sums and updates half the parameters and sends the other its half of the new weights. The
        # sum of two gradients is one addition, the same bits as MPI_Allreduce's, so the numbers do
        # not change. More processes keep MPI's Allreduce, whose sum order is MPI's own (changing it
        # would change last bits), and whose algorithms suit many hosts.
        sharded = None
        if mpi is not None and fused is not None and fused.op is not None and self.P == 2 and sharded_adam():
            sharded = mpi_op.sharded_ops()
        self._shard_gather = sharded[1] if sharded else None
        self._fused, self._comm_f = fused, comm_f

        def reduce(flat):  # the sum over processes (one process: the buffer itself)
            if self.P == 1:
                return flat
            if mpi is not None:
                return mpi(flat, comm_f)
            return tf.reshape(tf.numpy_function(self._allreduce_np, [flat], tf.float32, stateful=True), tf.shape(flat))

        def allreduce_step(x, y, k, inv_global):
            # Fused synchronous SGD (bench/allreduce_overhead.py): the loss is pre-scaled by 1/(global
            # batch) so the summed gradient is already the mean; one concat into a flat buffer (grads +
            # error flag), reduced in place by one Allreduce in the graph (labtools.mpi_op); Adam reads
            # it at offsets, unsplit.
            with tf.GradientTape() as tape:
                per, correct = forward(x, y, k, True)
                total = tf.reduce_sum(per) * inv_global
            grads = tape.gradient(total, tvars)
            if sharded is not None:
                return per, correct, fused.sharded_update(grads, sharded[0], comm_f)
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads] + [tf.zeros([1])], 0)
            red = reduce(flat)
            if fused is not None and fused.op is not None:
                return per, correct, fused.update(red)
            mean = [tf.reshape(g, s) for g, s in zip(tf.split(red, sizes + [1]), shapes)]
            return per, correct, update(mean)

        @tf.function(input_signature=many + (tf.TensorSpec([None], tf.float32),), reduce_retracing=True)
        def allreduce_steps(x, y, k, lrs, inv_global):
            # step i's Allreduce is the i-th of the call, so processes whose calls split the steps
            # differently still meet step by step
            return steps(allreduce_step, x, y, k, lrs, inv_global)

        @tf.function(input_signature=spec[:2], reduce_retracing=True)
        def evaluate(x, y):  # per-sample losses and correctness (summed per eval batch by Worker.evaluate)
            return forward(x, y, tf.zeros_like(y), False)

        self.local_steps, self.allreduce_steps, self.evaluate_fn = map(_concrete, (local_steps, allreduce_steps, evaluate))

    def _allreduce_np(self, flat: np.ndarray) -> np.ndarray:
        # Without the in-graph op. The buffer is the graph's own concat output, used by nobody else:
        # reduce it in place.
        if not flat.flags.writeable:
            flat = flat.copy()
        self.comm.allreduce_inplace(flat)
        self.comm.raise_if_peer_failed(flat)
        return flat

    def train_steps(self, idxs: list[np.ndarray], epoch: int, step0: int):
        """Steps step0, step0 + 1, ... of the current rank on the equal-size batches ``idxs`` (sample
        indices), in one graph call; per step: summed loss, correct count, gradient norm (NumPy)."""
        n, b = len(idxs), len(idxs[0])
        x, y, k = self.batch(np.concatenate(idxs), epoch)
        lrs = [self.lr_at(epoch, step0 + i) for i in range(n)]
        out = self.local_steps(x.reshape(n, b, *x.shape[1:]), y.reshape(n, b), k.reshape(n, b), np.array(lrs, np.float32))
        self._lr_now = lrs[-1]  # what the graph left in the optimizer (set_lr's cache)
        return tuple(o.numpy() for o in out)

    def sync_steps(self, x, y, k, epoch: int, step0: int):
        """Synchronous steps step0, step0 + 1, ... on prepared batches stacked along a first axis (the
        same size within a call), in one graph call; per step: per-sample losses, per-sample
        correctness, gradient norm (NumPy)."""
        n = len(x)
        lrs = [self.lr_at(epoch, step0 + i) for i in range(n)]
        inv = [1.0 / self.global_count(step0 + i) for i in range(n)]
        out = self.allreduce_steps(x, y, k, np.array(lrs, np.float32), np.array(inv, np.float32))
        self._lr_now = lrs[-1]
        return tuple(o.numpy() for o in out)

    def local_step(self, x, y, k):
        """One step on a prepared batch at the optimizer's current learning rate (benchmarks)."""
        lr = np.array([self.opt.learning_rate.numpy()], np.float32)
        return tuple(o[0] for o in self.local_steps(x[None], y[None], k[None], lr))

    def allreduce_step(self, x, y, k, inv_global):
        """One synchronous step on a prepared batch at the current learning rate (benchmarks)."""
        lr = np.array([self.opt.learning_rate.numpy()], np.float32)
        inv = np.array([inv_global], np.float32)
        return tuple(o[0] for o in self.allreduce_steps(x[None], y[None], k[None], lr, inv))

    def global_count(self, step: int) -> int:
        """Samples all N ranks contribute to a synchronous step (known everywhere without talking)."""
        return int(np.clip(self.all_shard_sizes - step * self.b, 0, self.b).sum())

    @property
    def sharded(self) -> bool:
        """Is the synchronous step's Adam sharded over the processes (LabtoolsShardedAdam)?"""
        return self._shard_gather is not None

    def gather_shards(self) -> None:
        """After sharded synchronous steps: every process takes the others' shares of the Adam moments,
        so the whole optimizer state is here again (for checkpoints and state swaps). Collective."""
        if self.sharded:
            with self.comm.waiting("the optimizer state's exchange"):
                for j in (0, 1):  # first moments, then second
                    self._shard_gather([slot[j].value.handle for slot in self._fused.slots], self._comm_f)

    def post_step_failure(self) -> None:
        """Join the current step's exchange with the error flag set, so peers do not wait forever."""
        if self._op_comm is None:
            self.comm.fail_step(self.n_params)
            return
        with self.comm.waiting("a failed synchronous step's exchange"):
            if self.sharded:
                mpi_op.fail_sharded_step(self._op_comm, self.sizes)
            else:  # the in-graph Allreduce's buffer, the flag set (as comm.fail_step, on the op's communicator)
                buf = np.zeros(self.n_params + 1, np.float32)
                buf[-1] = 1.0
                self._op_comm.Allreduce(self.comm.MPI.IN_PLACE, buf, op=self.comm.MPI.SUM)

    # ------------------------------------------------------------------ batches
    def batch(self, idx: np.ndarray, epoch: int):
        x = D.preprocess(self.xtr[idx], self.cfg.preprocess)
        return x, self.ytr[idx], D.dropout_keys(idx, epoch, self.cfg.seed)

    def check(self, rank: int, epoch: int) -> None:
        """Per-step failure hooks: a peer's failure or a signal (comm.check), or an injected failure."""
        self.comm.check()
        if self.inject and (int(self.inject[0]), int(self.inject[1])) == (rank, epoch):
            if self.inject[2:] == ["hang"]:
                while True:  # a process that stops answering (its peers' waits are bounded)
                    time.sleep(3600)
            raise InjectedFailure(f"injected failure on rank {rank} in epoch {epoch}")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy of the (synchronized) model; processes split the test set."""
        self.activate(self.ranks[0])
        idx = np.arange(self.comm.rank, len(self.yte), self.P)
        loss = correct = 0.0
        for i in range(0, len(idx), self.cfg.eval_batch):
            j = idx[i:i + self.cfg.eval_batch]
            # The forward pass in chunks: the activations of EVAL_CHUNK images at a time, not of a whole eval
            # batch (500 images held +50-70 MB on every rank); per-sample values do not depend on the chunk,
            # and the float32 sum is still one reduce_sum over the eval batch, so the totals are the same bits.
            per, ok = zip(*(self.evaluate_fn(D.preprocess(self.xte[j[k:k + self.EVAL_CHUNK]], self.cfg.preprocess),
                                             self.yte[j[k:k + self.EVAL_CHUNK]]) for k in range(0, len(j), self.EVAL_CHUNK)))
            loss += float(tf.reduce_sum(tf.concat(per, 0)))
            correct += float(tf.reduce_sum(tf.concat(ok, 0)))
        return loss, correct

    EVAL_CHUNK = 100

    PROBE_CHUNK = 32  # images per probe call: the root holds every layer's activations of one chunk only

    def dead_relus(self) -> dict:
        """Fraction of ReLU channels that output 0 on every image of a fixed probe batch. The batch is
        run in chunks and each channel's maximum kept (the same answer as one call): all of the
        network's activations for 256 images at once were the root's largest extra (+77 MB)."""
        idx = self._probe_idx
        top = None
        for i in range(0, len(idx), self.PROBE_CHUNK):
            j = idx[i:i + self.PROBE_CHUNK]
            outs = self.probe([D.preprocess(self.xtr[j], self.cfg.preprocess), np.zeros(len(j), np.int64)], training=False)
            m = [np.asarray(a).reshape(-1, a.shape[-1]).max(axis=0) for a in outs]  # NaN stays NaN: dead
            top = m if top is None else [np.maximum(t, x) for t, x in zip(top, m)]
        dead = total = 0
        conv10 = 0.0
        for name, mx in zip(self.probe.output_names_list, top):
            alive = np.maximum(mx, 0) > 0
            if name == "conv10":
                conv10 = float(1.0 - alive.mean())
            else:
                dead += int((~alive).sum())
                total += alive.size
        return {"dead_conv10_frac": conv10, "dead_relu_frac": dead / max(total, 1)}
