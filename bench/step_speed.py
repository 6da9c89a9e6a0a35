"""Benchmark: labtools' training speed against Keras ``model.fit``, and its P = 2 efficiency.

Interleaved, repeat by repeat, each in a fresh process with one TensorFlow thread, batch 12, the
same SqueezeNet builder, the same real CIFAR-10 images and the same Caffe-style preprocessing:

- ``fit``: ``model.compile(Adam(lr)); model.fit(x, y, batch_size=12)``, the loop a user would
  otherwise write; img/s of the warm (last) epoch, timed by a Keras callback.
- ``labtools``: ``labtools train --np 1 --threads 1``; img/s of the warm epoch from the rank CSV.
- ``labtools P=2``: ``mpiexec -n 2 labtools train --np 2``: the two processes' summed img/s in the
  warm epoch; efficiency = that / (2 x the P=1 img/s of the same repeat). Needs 2 idle cores.

    python bench/step_speed.py [--images 4800] [--epochs 2] [--repeats 3]

Writes bench/results/step_speed.json (every repeat, and min/median/max of each ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labtools import provenance, results  # noqa: E402

BIN = Path(sys.executable).parent
FIT = r"""
import json, os, sys, time
import keras, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1); tf.config.threading.set_inter_op_parallelism_threads(1)
from labtools import data as D
from labtools.model import squeezenet_v1_1
n, epochs, lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
xtr, ytr, _, _ = D.load_cifar10(D.find_cifar_dir(None), test=False, limit_train=n)
x = D.preprocess(xtr, "caffe")
keras.utils.set_random_seed(0)
model = squeezenet_v1_1()
model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
class T(keras.callbacks.Callback):
    def on_epoch_begin(self, e, logs=None): self.t = time.perf_counter()
    def on_epoch_end(self, e, logs=None): self.last = time.perf_counter() - self.t
t = T()
model.fit(x, ytr, batch_size=12, epochs=epochs, shuffle=False, verbose=0, callbacks=[t])
print(json.dumps({"img_per_s": n / t.last}))
"""


def fit(images: int, epochs: int) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = subprocess.run([sys.executable, "-c", FIT, str(images), str(epochs), "5e-4"], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["img_per_s"]


def train(images: int, epochs: int, processes: int, out: str, name: str) -> float:
    """Summed warm-epoch img/s of the processes of one `labtools train` run."""
    cmd = [str(BIN / "labtools"), "train", "--np", str(processes), "--ranks-per-node", str(processes),
           "--batch-per-node", str(12 * processes), "--threads", "1", "--epochs", str(epochs),
           "--limit-train", str(images), "--limit-test", "500", "--no-diagnostics", "--quiet",
           "--no-checkpoint", "--out", out, "--experiment", name]
    if processes > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(processes)] + cmd
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    run = max((p for p in Path(out, name).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    rk = results.load_rank_epochs(run)
    warm = rk[rk.epoch == rk.epoch.max()]
    return float(warm.img_per_s.sum())


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4800, help="training images per epoch (default: 4800)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs; the last is the warm one (default: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: 3)")
    ap.add_argument("--no-p2", action="store_true", help="skip the P = 2 efficiency runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_speed.json"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-step-")
    reps = []
    for i in range(a.repeats):
        rep = {"fit": fit(a.images, a.epochs), "labtools": train(a.images, a.epochs, 1, tmp, f"p1-{i}")}
        if not a.no_p2:
            rep["labtools_p2"] = train(a.images, a.epochs, 2, tmp, f"p2-{i}")
            rep["p2_efficiency"] = rep["labtools_p2"] / (2 * rep["labtools"])
        rep["labtools_over_fit"] = rep["labtools"] / rep["fit"]
        reps.append(rep)
        print(json.dumps(rep), flush=True)
    out = {"repeats": reps, "images_per_epoch": a.images, "epochs": a.epochs, "batch_per_rank": 12, "threads": 1,
           "ratio_labtools_over_fit": spread([r["labtools_over_fit"] for r in reps]),
           **({"p2_efficiency": spread([r["p2_efficiency"] for r in reps])} if not a.no_p2 else {}),
           "fused_adam": _fused(), "steps_per_call": _per_call(), **provenance.sidecar(date_utc=provenance.utc_now())}
    results.write_json(a.out, out)
    print(json.dumps({k: out[k] for k in out if k.startswith(("ratio", "p2"))}, indent=1))


def _per_call() -> int:
    from labtools.config import steps_per_call

    return steps_per_call()


def _fused() -> str:
    from labtools import fused_adam

    return fused_adam.reason()


if __name__ == "__main__":
    main()
