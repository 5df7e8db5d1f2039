"""Images made from a trained teacher alone, for distilling and calibrating without the training data.

DeepInversion (Yin et al., CVPR 2020) optimises a batch of images, from noise, so that

- the teacher puts each image in the class chosen for it (cross-entropy on the teacher's logits);
- the input of every BatchNormalization layer of the teacher has, over the batch, the mean and variance
  the layer recorded in training (its moving statistics): the sum over layers of
  ``‖μ_batch − μ_moving‖₂ + ‖σ²_batch − σ²_moving‖₂`` (``bn_statistics_loss``), the term that carries what
  the teacher knows about its data;
- the images are smooth (the squared differences of neighbouring pixels) and not extreme (an l2 prior);
- given a student and ``adaptive`` > 0 (Adaptive DeepInversion), the images are also pulled to where the
  student and the teacher disagree: ``adaptive · (1 − JS(teacher ‖ student))``.

Every step sees the batch jittered (a random roll of up to ``jitter`` pixels) and randomly flipped, so the
images do not overfit one view. The images are raw pixels ``255 · sigmoid(z)`` of a free variable ``z``
(always in range), mapped to the models' input by the data's ``scale`` and ``offset``; ``synthesize``
returns them as uint8, the form every other image in edge-kd has, so they feed the same data pipeline.
Everything random is drawn from ``seed``: the same seed gives the same images.
"""
from __future__ import annotations

import contextlib
from typing import Annotated, ClassVar, Sequence

import numpy as np

from edge_kd.config import Bool, Config, Field, Float, Int
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf


def batchnorm_layers(model: keras.Model) -> list:
    """Returns every BatchNormalization layer of ``model``, nested models included, in order."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def require_batchnorm(model: keras.Model) -> list:
    """Returns ``batchnorm_layers(model)``; none is a UserError saying why DeepInversion needs them."""
    bn = batchnorm_layers(model)
    if not bn:
        raise UserError(f"teacher '{model.name}' has no BatchNormalization layer: DeepInversion matches the "
                        "statistics those layers recorded in training, and without them it has nothing of the "
                        "data to match; bring a teacher with batch normalization, or the training images")
    return bn


@contextlib.contextmanager
def recording(bn: Sequence) -> list:
    """Within the block, each call of a layer of ``bn`` appends ``(layer, its input)`` to the list yielded."""
    seen, saved = [], []
    for layer in bn:
        original = layer.call

        def call(inputs, *args, _layer=layer, _call=original, **kwargs):
            seen.append((_layer, inputs))
            return _call(inputs, *args, **kwargs)

        saved.append((layer, original))
        layer.call = call
    try:
        yield seen
    finally:
        for layer, original in saved:
            layer.call = original


def bn_statistics_loss(recorded: Sequence) -> tf.Tensor:
    """Returns the sum over ``(BatchNormalization layer, its input)`` pairs of the l2 distances between the
    batch's per-channel mean and (biased) variance and the layer's moving mean and variance."""
    total = tf.constant(0.0)
    for layer, x in recorded:
        x = tf.cast(x, tf.float32)
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        axis = [a % x.shape.rank for a in axis]
        mean, var = tf.nn.moments(x, [a for a in range(x.shape.rank) if a not in axis])
        total += (tf.norm(mean - tf.cast(layer.moving_mean, tf.float32))
                  + tf.norm(var - tf.cast(layer.moving_variance, tf.float32)))
    return total


def _js_divergence(p_logits, q_logits) -> tf.Tensor:
    p, q = tf.nn.softmax(p_logits), tf.nn.softmax(q_logits)
    m = 0.5 * (p + q)

    def kl(a, b):
        return tf.reduce_sum(a * (tf.math.log(tf.maximum(a, 1e-12)) - tf.math.log(tf.maximum(b, 1e-12))), -1)

    return tf.reduce_mean(0.5 * kl(p, m) + 0.5 * kl(q, m))


class InversionConfig(Config):
    """The weights and schedule of one batch's optimisation; a wrong value is a one-line UserError."""

    KEY: ClassVar[str] = "synthesize"
    steps: Annotated[Int, Field(ge=1)] = 200
    learning_rate: Annotated[Float, Field(gt=0)] = 0.1
    bn_weight: Annotated[Float, Field(ge=0)] = 1.0
    #: of the mean squared difference of neighbouring pixels (pixels in [0, 1])
    tv_weight: Annotated[Float, Field(ge=0)] = 1.0
    #: of the mean squared distance of the pixels (in [0, 1]) from mid-grey
    l2_weight: Annotated[Float, Field(ge=0)] = 0.0
    jitter: Annotated[Int, Field(ge=0)] = 2
    flip: Bool = True


class Inverter:
    """Makes images from ``teacher`` (a model of the data's input to logits, with BatchNormalization layers).

    ``input_shape`` (H, W, C) and ``scale``/``offset`` are the data's: the models see ``raw * scale + offset``.
    """

    def __init__(self, teacher: keras.Model, input_shape: Sequence[int], scale: float = 1 / 255.0,
                 offset: float = 0.0, config: InversionConfig | None = None):
        self.teacher = teacher
        self.bn = require_batchnorm(teacher)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.scale, self.offset = float(scale), float(offset)
        self.config = config or InversionConfig()
        self._step = None

    def _inputs(self, z):
        return 255.0 * tf.sigmoid(z) * self.scale + self.offset

    def losses(self, x, labels, student=None, adaptive: float = 0.0) -> dict:
        """Returns the terms of the loss on model inputs ``x`` of classes ``labels`` (one forward pass); with a
        ``student`` and ``adaptive`` > 0, Adaptive DeepInversion's ``adaptive · (1 − JS(teacher ‖ student))`` too."""
        c = self.config
        with recording(self.bn) as seen:
            logits = self.teacher(x, training=False)
        terms = {"ce": tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)),
                 "bn": bn_statistics_loss(seen)}
        raw = (x - self.offset) / self.scale / 255.0  # the images in [0, 1], whatever the input range
        terms["tv"] = (tf.reduce_mean(tf.square(raw[:, 1:] - raw[:, :-1]))
                       + tf.reduce_mean(tf.square(raw[:, :, 1:] - raw[:, :, :-1])))
        terms["l2"] = tf.reduce_mean(tf.square(raw - 0.5))
        terms["total"] = (terms["ce"] + c.bn_weight * terms["bn"] + c.tv_weight * terms["tv"]
                          + c.l2_weight * terms["l2"])
        if student is not None and adaptive:
            terms["js"] = _js_divergence(logits, student(x, training=False))
            terms["total"] += adaptive * (1.0 - terms["js"])
        terms["accuracy"] = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                                                   tf.float32))
        return terms

    def statistics_loss(self, x) -> float:
        """Returns ``bn_statistics_loss`` of the batch of model inputs ``x`` (as the teacher sees it, unjittered)."""
        with recording(self.bn) as seen:
            self.teacher(tf.constant(x, tf.float32), training=False)
        return float(bn_statistics_loss(seen))

    def synthesize(self, labels, seed: int, student=None, adaptive: float = 0.0, callback=None) -> np.ndarray:
        """Returns uint8 images (N, H, W, C), one of each class in ``labels``, made from the seed ``seed`` (with a
        ``student`` and ``adaptive`` > 0, also pulled to where it disagrees with the teacher: ``losses``).

        ``callback(step, terms)``, when given, is called every 50 steps and at the last.
        """
        c = self.config
        labels = tf.constant(np.asarray(labels, np.int32))
        n = int(labels.shape[0])
        z = tf.Variable(tf.random.stateless_normal((n, *self.input_shape), seed=[seed, 0]))
        opt = keras.optimizers.Adam(c.learning_rate, beta_1=0.5, beta_2=0.9)

        @tf.function
        def step(i):
            s = tf.stack([tf.constant(seed, tf.int32), i + 1])
            with tf.GradientTape() as tape:
                x = self._inputs(z)
                if c.jitter:
                    dx = tf.random.stateless_uniform((2,), s, -c.jitter, c.jitter + 1, dtype=tf.int32)
                    x = tf.roll(x, dx, axis=[1, 2])
                if c.flip:
                    flip = tf.random.stateless_uniform((), s + 7) < 0.5
                    x = tf.cond(flip, lambda: tf.reverse(x, [2]), lambda: x)
                terms = self.losses(x, labels, student, adaptive)
            opt.apply_gradients([(tape.gradient(terms["total"], z), z)])
            return terms

        for i in range(c.steps):
            terms = step(tf.constant(i, tf.int32))
            if callback is not None and ((i + 1) % 50 == 0 or i + 1 == c.steps):
                callback(i + 1, {k: float(v) for k, v in terms.items()})
        return np.round(255.0 * tf.sigmoid(z).numpy()).astype(np.uint8)


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """Returns ``n`` labels with every class as often as it can be (the remainder drawn from ``seed``), shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes).repeat(n // num_classes),
                             rng.choice(num_classes, n % num_classes, replace=False)])
    return rng.permutation(labels).astype(np.int32)
