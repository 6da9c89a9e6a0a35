"""Benchmark: how fast could any optimizer step be, next to Keras ``fit``? An upper bound for the
``labtools train`` / ``fit`` ratio that bench/step_speed.py measures.

In one process, one TensorFlow thread, batch 12, the same SqueezeNet builder, real CIFAR-10 with
Caffe-style preprocessing, interleaved repeat by repeat:

- ``fit``: ``model.fit`` for one epoch (img/s of that epoch, after a warm-up epoch);
- ``forward+backward``: a ``tf.function`` computing the loss and every gradient, with no update at
  all, over the same batches, called the way ``labtools train`` calls its steps (16 batches per
  call, a loop in the graph, through ``labtools.worker._concrete``), so that it is not slowed by a
  per-call cost labtools does not pay.

- ``labtools``: labtools' own steps (``Worker.train_steps``: preprocessing from uint8, forward,
  backward, fused Adam, 16 batches per call), as ``labtools train --np 1`` runs them.

Any training step, ours included, does at least the forward and backward pass with the same kernels
(other kernels would change the numbers), so ``forward+backward img/s / fit img/s`` bounds the ratio
``labtools train`` can reach against ``fit`` without changing the numbers. ``labtools img/s / fit
img/s`` is that ratio measured within one process, minutes apart at most, where bench/step_speed.py's
fresh processes see this machine's drift between runs.

    python bench/step_bound.py [--images 2400] [--repeats 3]

Writes bench/results/step_bound.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_bound.json"))
    a = ap.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from labtools import data as D, provenance, results
    from labtools.model import squeezenet_v1_1

    xtr, ytr, _, _ = D.load_cifar10(D.find_cifar_dir(None), test=False, limit_train=a.images)
    x = D.preprocess(xtr, "caffe")
    keras.utils.set_random_seed(0)
    model = squeezenet_v1_1()
    model.compile(optimizer=keras.optimizers.Adam(5e-4), loss="sparse_categorical_crossentropy")
    tvars = model.trainable_variables
    from labtools.config import steps_per_call
    from labtools.worker import _concrete

    per_call = steps_per_call()
    xb, yb = x[:len(x) // 12 * 12].reshape(-1, 12, 32, 32, 3), ytr[:len(x) // 12 * 12].reshape(-1, 12)
    groups = [(xb[i:i + per_call], yb[i:i + per_call]) for i in range(0, len(xb), per_call)]

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 32, 32, 3], tf.float32), tf.TensorSpec([None, 12], tf.int64)])
    def fwd_bwd(xs, ys):
        total = tf.constant(0.0)
        for i in tf.range(tf.shape(xs)[0]):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(ys[i], model(xs[i], training=True)))
            total += tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, tvars)])  # every gradient computed
        return total

    fwd_bwd = _concrete(fwd_bwd)

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, e, logs=None):
            self.last = time.perf_counter() - self.t

    def fit_rate():
        t = Timer()
        model.fit(x, ytr, batch_size=12, epochs=1, shuffle=False, verbose=0, callbacks=[t])
        return a.images / t.last

    def fwd_bwd_rate():
        t = time.perf_counter()
        for xs, ys in groups:
            float(fwd_bwd(xs, ys))
        return len(xb) * 12 / (time.perf_counter() - t)

    from labtools.comm import Comm
    from labtools.config import RunConfig
    from labtools.worker import Worker

    cfg = RunConfig(np=1, ranks_per_node=1, batch_per_node=12, limit_train=a.images, diagnostics=False, threads=1)
    w = Worker(cfg, Comm(), 1, xtr, ytr, None, None)
    order, nb = w.shards[0], len(xb)

    def labtools_rate():
        t = time.perf_counter()
        for s in range(0, nb, per_call):
            w.train_steps([order[j * 12:(j + 1) * 12] for j in range(s, min(s + per_call, nb))], 0, s)
        return nb * 12 / (time.perf_counter() - t)

    fit_rate(), fwd_bwd_rate(), labtools_rate()  # warm-up: tracing, allocator pools
    reps = []
    for _ in range(a.repeats):
        r = {"fit_img_s": fit_rate(), "fwd_bwd_img_s": fwd_bwd_rate(), "labtools_img_s": labtools_rate()}
        r["bound"] = r["fwd_bwd_img_s"] / r["fit_img_s"]
        r["labtools_over_fit"] = r["labtools_img_s"] / r["fit_img_s"]
        reps.append(r)
        print(json.dumps(r), flush=True)
    b = [r["bound"] for r in reps]
    out = {"repeats": reps, "images": a.images, "batch": 12, "threads": 1, "steps_per_call": per_call,
           "bound_fwd_bwd_over_fit": {"min": min(b), "median": statistics.median(b), "max": max(b), "n": len(b)},
           **provenance.sidecar(date_utc=provenance.utc_now())}
    results.write_json(a.out, out)
    print(json.dumps(out["bound_fwd_bwd_over_fit"]))


if __name__ == "__main__":
    main()
