"""SqueezeNet v1.1 for 32x32x3 inputs, as the keras-squeezenet module the paper adapted builds it.

conv1 64@3x3/2 'valid' -> maxpool 3/2 -> fire2,3 -> maxpool -> fire4,5 -> maxpool -> fire6..9
-> dropout 0.5 -> conv10 1x1 (classes) + ReLU -> global average pool -> softmax.
727,626 parameters; spatial sizes 32 -> 15 -> 7 -> 3 -> 1.

The final ReLU is the paper's (and keras-squeezenet's); once every conv10 channel is dead the
softmax sees all-zero logits and the loss is exactly ln 10 -- the paper's "collapse" value.

``keyed_dropout=True`` makes the dropout mask a pure function of a per-sample integer key
(an extra model input) instead of a stateful RNG. labtools keys it by (seed, epoch, sample
index), so the mask a sample gets does not depend on which rank or process trains it: that is
what lets N logical ranks on P processes reproduce N real ranks exactly.

This module imports nothing from labtools.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

CONV10_INITS = ("keras", "caffe")
PADDINGS = ("valid", "same")


def _fire(x, name: str, squeeze: int, expand: int):
    s = layers.Conv2D(squeeze, 1, padding="valid", activation="relu", name=f"{name}_squeeze1x1")(x)
    e1 = layers.Conv2D(expand, 1, padding="valid", activation="relu", name=f"{name}_expand1x1")(s)
    e3 = layers.Conv2D(expand, 3, padding="same", activation="relu", name=f"{name}_expand3x3")(s)
    return layers.Concatenate(axis=-1, name=f"{name}_concat")([e1, e3])


def _mix32(x):
    """murmur3 finaliser on int64 tensors holding 32-bit values (no overflow: products < 2^63)."""
    m = tf.constant(0xFFFFFFFF, tf.int64)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = (x * 0x85EBCA6B) & m
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 13))
    x = (x * 0xC2B2AE35) & m
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


class KeyedDropout(layers.Layer):
    """Inverted dropout whose mask for sample i is a hash of (key_i, unit index)."""

    def __init__(self, rate: float, **kw):
        super().__init__(**kw)
        self.rate = float(rate)

    def call(self, inputs, training=None):
        x, key = inputs
        if not training or self.rate == 0.0:
            return x
        shape = tf.shape(x)
        units = tf.reduce_prod(shape[1:])
        unit = tf.range(tf.cast(units, tf.int64), dtype=tf.int64)[None, :]
        k = tf.cast(tf.reshape(key, [-1, 1]), tf.int64) & 0x7FFFFFFF
        h = _mix32(((k * 0x9E3779B1) & 0xFFFFFFFF) ^ _mix32(unit + 0x632BE5AB))
        u = tf.cast(h, tf.float32) / 4294967296.0
        keep = tf.reshape(tf.cast(u >= self.rate, x.dtype), shape)
        return x * keep / (1.0 - self.rate)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def squeezenet_v1_1(
    num_classes: int = 10,
    input_shape=(32, 32, 3),
    final_relu: bool = True,
    conv10_init: str = "keras",
    padding: str = "valid",
    dropout: float = 0.5,
    keyed_dropout: bool = False,
) -> keras.Model:
    """Build SqueezeNet v1.1. Defaults are the paper's model; the rest are study options."""
    if conv10_init not in CONV10_INITS:
        raise ValueError(f"conv10_init must be one of {CONV10_INITS}, not {conv10_init!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
    img = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(64, 3, strides=2, padding=padding, activation="relu", name="conv1")(img)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = _fire(x, "fire2", 16, 64)
    x = _fire(x, "fire3", 16, 64)
    x = layers.MaxPooling2D(3, strides=2, name="pool3")(x)
    x = _fire(x, "fire4", 32, 128)
    x = _fire(x, "fire5", 32, 128)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = _fire(x, "fire6", 48, 192)
    x = _fire(x, "fire7", 48, 192)
    x = _fire(x, "fire8", 64, 256)
    x = _fire(x, "fire9", 64, 256)
    inputs = img
    if keyed_dropout:
        key = keras.Input(shape=(), dtype="int64", name="dropout_key")
        x = KeyedDropout(dropout, name="drop9")([x, key])
        inputs = [img, key]
    else:
        x = layers.Dropout(dropout, name="drop9")(x)
    # The original Caffe SqueezeNet v1.1 initialises conv10 with N(0, 0.01); Keras uses Glorot.
    init = keras.initializers.RandomNormal(0.0, 0.01) if conv10_init == "caffe" else "glorot_uniform"
    x = layers.Conv2D(num_classes, 1, padding="valid", kernel_initializer=init, name="conv10")(x)
    if final_relu:
        x = layers.Activation("relu", name="relu_conv10")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Activation("softmax", name="softmax")(x)
    return keras.Model(inputs, out, name="squeezenet_v1_1")


def relu_probe(model: keras.Model) -> keras.Model:
    """A model returning the post-ReLU activations of every ReLU layer plus conv10's pre-activation.

    Used by diagnostics: a channel is dead when its ReLU output is 0 on every probe image.
    """
    outs, names = [], []
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.name != "conv10":
            outs.append(layer.output)
            names.append(layer.name)
    outs.append(model.get_layer("conv10").output)  # pre-activation; ReLU applied by the caller
    names.append("conv10")
    probe = keras.Model(model.inputs, outs, name="relu_probe")
    probe.output_names_list = names
    return probe
