"""Equivalences between sync strategies and against a reference loop (one process, real CIFAR-10)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from labtools import data as D
from labtools.config import RunConfig
from labtools.model import squeezenet_v1_1
from labtools.train import run

pytestmark = pytest.mark.slow


def rel_diff(a, b) -> float:
    """Relative L2 distance. Elementwise tolerances are the wrong test here: float round-off can
    flip one ReLU near zero, which moves one bias by ~1e-4 and nothing else measurably."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


TOL = 1e-4


def _weights(tmp_path, name, cifar_dir, **kw):
    base = dict(limit_train=192, limit_test=50, epochs=2, cifar_dir=cifar_dir, out=str(tmp_path),
                experiment=name, save_weights=True, quiet=True, diagnostics=False, threads=1)
    s = run(RunConfig(**{**base, **kw}))
    return np.load(f"{s['run_dir']}/final_weights.npy"), s


def test_allreduce_equals_one_process_with_big_batch(cifar_dir, tmp_path):
    """N ranks of batch b under allreduce == one rank of batch N*b. With strided shards, step s of
    the N ranks covers exactly the samples s*N*b .. (s+1)*N*b - 1, the big batch's step s."""
    a, _ = _weights(tmp_path, "ar", cifar_dir, np=4, batch_per_node=8, ranks_per_node=2, sync="allreduce",
                    optimizer="sgd", momentum=0.0, lr=0.01)
    b, _ = _weights(tmp_path, "big", cifar_dir, np=1, batch_per_node=16, ranks_per_node=1, sync="allreduce",
                    optimizer="sgd", momentum=0.0, lr=0.01)
    assert rel_diff(a, b) < TOL, rel_diff(a, b)


def test_local_sgd_h1_equals_allreduce_for_plain_sgd(cifar_dir, tmp_path):
    kw = dict(np=4, optimizer="sgd", momentum=0.0, lr=0.01)
    a, _ = _weights(tmp_path, "l1", cifar_dir, sync="local-sgd", sync_every=1, **kw)
    b, _ = _weights(tmp_path, "ar", cifar_dir, sync="allreduce", **kw)
    assert rel_diff(a, b) < TOL, rel_diff(a, b)


def test_epoch_average_with_one_rank_equals_plain_training(cifar_dir, tmp_path):
    """N=1 epoch-average against a plain Keras GradientTape loop written here from scratch."""
    w, s = _weights(tmp_path, "ea1", cifar_dir, np=1, ranks_per_node=1, batch_per_node=12)
    keras.utils.set_random_seed(0)
    model = squeezenet_v1_1(keyed_dropout=True)
    opt = keras.optimizers.Adam(5e-4)
    xtr, ytr, _, _ = D.load_cifar10(cifar_dir, test=False, limit_train=192)
    import tensorflow as tf

    for epoch in range(2):
        for i in range(0, 192, 12):
            idx = np.arange(i, i + 12)
            x = D.preprocess(xtr[idx], "caffe")
            with tf.GradientTape() as tape:
                p = model([x, D.dropout_keys(idx, epoch, 0)], training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(ytr[idx], p))
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    ref = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    assert rel_diff(w, ref) < TOL, rel_diff(w, ref)


def test_average_implementations_agree(cifar_dir, tmp_path):
    """The paper's gather/bcast average and the Allreduce average give the same model."""
    a, _ = _weights(tmp_path, "gb", cifar_dir, np=4, average_impl="gather-bcast")
    b, _ = _weights(tmp_path, "ar", cifar_dir, np=4, average_impl="allreduce")
    assert rel_diff(a, b) < TOL, rel_diff(a, b)
    c, _ = _weights(tmp_path, "one", cifar_dir, np=1, ranks_per_node=1, batch_per_node=12)
    assert rel_diff(a, c) > 1e-3  # averaging 4 ranks is not the same as 1 rank


def test_diagnostics_observe_without_changing_training(cifar_dir, tmp_path):
    """The dead-ReLU probes (at initialisation and after each epoch) must not perturb the run."""
    a, sa = _weights(tmp_path, "diag", cifar_dir, np=2, diagnostics=True)
    b, sb = _weights(tmp_path, "nodiag", cifar_dir, np=2, diagnostics=False)
    assert np.array_equal(a, b)
    assert 0.0 <= sa["init_dead_conv10_frac"] <= 1.0 and 0.0 <= sa["init_dead_relu_frac"] <= 1.0
    assert "init_dead_conv10_frac" not in sb


def test_steps_per_call_changes_speed_not_numbers(cifar_dir, tmp_path, monkeypatch):
    """Several local steps per graph call (a loop in the graph) give the bits of one step per call:
    with a short last batch, a learning rate that changes every step, and local SGD's syncs falling
    inside a call's span."""
    kw = dict(np=2, ranks_per_node=2, batch_per_node=24, limit_train=202, sync="local-sgd", sync_every=7,
              warmup_epochs=1, lr_schedule="cosine", lr_scaling="linear")
    got = {}
    for n in ("1", "5", "16"):
        monkeypatch.setenv("LABTOOLS_STEPS_PER_CALL", n)
        got[n], _ = _weights(tmp_path, f"spc{n}", cifar_dir, **kw)
    assert np.array_equal(got["1"], got["5"]) and np.array_equal(got["1"], got["16"])
