"""labtools.fused_adam: the fused kernel gives Keras Adam's bits, for per-variable and flat gradients."""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from labtools import fused_adam
from labtools.fused_adam import FusedAdam
from labtools.model import squeezenet_v1_1


@pytest.fixture(scope="module")
def setup():
    if fused_adam.kernel() is None:
        if os.environ.get("CI"):
            pytest.fail(f"the fused Adam kernel must build in CI: {fused_adam.reason()}")
        pytest.skip(fused_adam.reason())
    keras.utils.set_random_seed(0)
    model = squeezenet_v1_1(keyed_dropout=True)
    tv = list(model.trainable_variables)
    rng = np.random.default_rng(1)
    grads = [[tf.constant(rng.normal(0, s, v.shape).astype(np.float32)) for v in tv] for s in (1e-3, 1e-2, 1.0)]
    return tv, [v.numpy() for v in tv], grads


def _train(tv, w0, grads, how: str):
    """12 steps, the learning rate changed halfway (as set_lr does); the weights and optimizer state."""
    for v, a in zip(tv, w0):
        v.assign(a)
    opt = keras.optimizers.Adam(5e-4)
    opt.build(tv)
    fused = FusedAdam(opt, tv)
    if how == "fallback":
        fused.op = None

    @tf.function
    def step(g):
        if how == "keras":
            opt.apply(g, tv)
            return tf.linalg.global_norm(g)
        return fused.update(tf.concat([tf.reshape(x, [-1]) for x in g] + [tf.zeros([1])], 0)[:-1]
                            if how == "flat" else g)

    norms = []
    for i in range(12):
        if i == 6:
            opt.learning_rate = 2e-4
        norms.append(float(step(grads[i % len(grads)])))
    return [v.numpy() for v in tv], [v.numpy() for v in opt.variables], norms


@pytest.mark.parametrize("how", ["list", "flat", "fallback"])
def test_fused_adam_is_bit_identical_to_keras(setup, how):
    tv, w0, grads = setup
    w_ref, s_ref, n_ref = _train(tv, w0, grads, "keras")
    w, s, n = _train(tv, w0, grads, how)
    assert all(np.array_equal(a, b) for a, b in zip(w_ref, w)), "weights differ from Keras Adam"
    assert all(np.array_equal(a, b) for a, b in zip(s_ref, s)), "optimizer state differs from Keras Adam"
    np.testing.assert_allclose(n, n_ref, rtol=1e-5)  # the norm is a statistic: summation order may differ
    assert not all(np.array_equal(a, b) for a, b in zip(w0, w))  # it did train


def test_unsupported_adam_options_are_refused(setup):
    tv, _, _ = setup
    opt = keras.optimizers.Adam(5e-4, amsgrad=True)
    opt.build(tv)
    with pytest.raises(ValueError, match="plain Adam only"):
        FusedAdam(opt, tv)
