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
Everything random is drawn from ``seed``, and the compiled steps run without Grappler (``exact_graphs``): the
same seed gives the same images, in any process.
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


@contextlib.contextmanager
def exact_graphs():
    """Within the block, compiled functions run as traced, without TensorFlow's graph optimiser (Grappler): with it,
    the gradient of the BN-statistics loss through the ResNet-8 Fashion-MNIST teacher came out different in the last
    bits from one process to the next, and hundreds of synthesis steps grew those bits into other images. Without
    it the generator's weights after 20 steps were the same in every process, and a step took as long (200 steps
    each, interleaved: ratio 1.000)."""
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


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

        ``callback(step, terms)``, when given, is called every ``REPORT_EVERY`` steps and at the last.
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

        with exact_graphs():
            for i in range(c.steps):
                terms = step(tf.constant(i, tf.int32))
                _report(callback, i, c.steps, i + 1, terms)
        return np.round(255.0 * tf.sigmoid(z).numpy()).astype(np.uint8)


#: how often (in steps) synthesis reports its progress to a callback
REPORT_EVERY = 50


def _report(callback, i: int, steps: int, at: int, terms: dict) -> None:
    """Calls ``callback(at, terms as floats)`` after iteration ``i`` (from 0) of ``steps`` when it is a multiple of
    ``REPORT_EVERY`` or the last; nothing without a callback."""
    if callback is not None and ((i + 1) % REPORT_EVERY == 0 or i + 1 == steps):
        callback(at, {k: float(v) for k, v in terms.items()})


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """Returns ``n`` labels with every class as often as it can be (the remainder drawn from ``seed``), shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes).repeat(n // num_classes),
                             rng.choice(num_classes, n % num_classes, replace=False)])
    return rng.permutation(labels).astype(np.int32)


class GeneratorConfig(Config):
    """Adversarial synthesis: a class-conditional generator trained against the teacher and a companion student.

    Each iteration takes one generator step, on the teacher's cross-entropy for the asked class, its
    BN-statistics loss (``bn_weight``) and, with ``adversarial`` > 0, minus the mean absolute difference of
    the teacher's and the companion student's logits (DFAD, Fang et al. 2019: the generator seeks the images
    the student still gets wrong); then ``student_steps`` steps of the companion student, which imitates the
    teacher's logits (the same l1) on fresh images. The generator's images are kept at the end of each of
    ``rounds`` equal parts of the training (the bank the student is distilled on, as CMI and Fast-DFKD keep).

    With ``diversity`` > 0 the generator's loss also takes minus ``diversity`` × ``mode_seeking``: over the pairs of
    its batch asked for the same class, the mean distance between their images over the distance between their
    noise vectors (mode seeking, Mao et al., CVPR 2019), so that one class's images differ as its noise does
    instead of collapsing to a few.
    """

    KEY: ClassVar[str] = "synthesize"
    #: iterations in all (each a generator step and ``student_steps`` student steps)
    steps: Annotated[Int, Field(ge=1)] = 1000
    learning_rate: Annotated[Float, Field(gt=0)] = 1e-3
    bn_weight: Annotated[Float, Field(ge=0)] = 1.0
    adversarial: Annotated[Float, Field(ge=0)] = 1.0
    student_steps: Annotated[Int, Field(ge=1)] = 5
    student_learning_rate: Annotated[Float, Field(gt=0)] = 1e-3
    #: the size of the generator's noise vector
    latent: Annotated[Int, Field(ge=1)] = 64
    #: the training is split in this many equal parts; at the end of each, the images are drawn (an equal share of
    #: them) and the state kept, so a stopped run resumes after its last finished part
    rounds: Annotated[Int, Field(ge=1)] = 8
    #: the weight of the within-class diversity term (``mode_seeking``); 0 leaves it out. 20 measured better than 0
    #: on Fashion-MNIST and MNIST (docs/benchmarks.md, "Data-free distillation")
    diversity: Annotated[Float, Field(ge=0)] = 20.0
    #: the generator's width: the channels of its smallest map and of its first convolution, then of its second
    #: (``build_generator``); most of an iteration's arithmetic at the default
    filters: Annotated[list[Annotated[Int, Field(ge=1)]], Field(min_length=2, max_length=2)] = [128, 64]


def mode_seeking(images, noise, labels):
    """Returns the mean, over the ordered pairs (i, j), i ≠ j, of a batch whose ``labels`` are equal, of the mean
    absolute difference of ``images`` i and j over that of their ``noise`` vectors (0 when no two labels agree)."""
    n = tf.shape(images)[0]
    flat = tf.reshape(tf.cast(images, tf.float32), [n, -1])
    dx = tf.reduce_mean(tf.abs(flat[:, None, :] - flat[None, :, :]), -1)
    dz = tf.reduce_mean(tf.abs(noise[:, None, :] - noise[None, :, :]), -1)
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32) * (1.0 - tf.eye(n))
    return tf.math.divide_no_nan(tf.reduce_sum(same * dx / (dz + 1e-8)), tf.reduce_sum(same))


def build_generator(input_shape: Sequence[int], num_classes: int, latent: int, seed: int,
                    filters: Sequence[int]) -> keras.Model:
    """Returns a class-conditional generator: (noise (latent,), class (int)) → images in [0, 1] of ``input_shape``.

    Dense to a map of a quarter of the size with ``filters[0]`` channels, then two ×2 upsamplings each followed by
    conv (``filters[0]``, then ``filters[1]``) → BN → LeakyReLU, a 3×3 conv to the channels and a sigmoid; cropped to
    (H, W) where H or W is not a multiple of 4.
    """
    layers = keras.layers
    h, w, c = (int(d) for d in input_shape)
    h0, w0 = -(-h // 4), -(-w // 4)
    init = keras.initializers.GlorotUniform(seed=seed)
    z = keras.Input((latent,), name="noise")
    y = keras.Input((), dtype="int32", name="label")
    x = layers.Concatenate()([z, layers.Embedding(num_classes, latent, embeddings_initializer=keras.initializers
                                                  .RandomNormal(seed=seed + 1))(y)])
    x = layers.Dense(h0 * w0 * filters[0], kernel_initializer=init)(x)
    x = layers.Reshape((h0, w0, filters[0]))(layers.BatchNormalization()(x))
    for i, width in enumerate(filters):
        x = layers.UpSampling2D()(x)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False,
                          kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2 + i))(x)
        x = layers.LeakyReLU(0.2)(layers.BatchNormalization()(x))
    x = layers.Conv2D(c, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 9))(x)
    x = layers.Activation("sigmoid")(x)
    if (h0 * 4, w0 * 4) != (h, w):
        x = layers.Cropping2D(((0, h0 * 4 - h), (0, w0 * 4 - w)))(x)
    return keras.Model([z, y], x, name="generator")


class AdversarialSynthesizer:
    """Trains a generator of images for ``teacher`` (data input → logits, with BatchNormalization layers) against
    ``student`` (a fresh model of the same input and classes, trained here to imitate the teacher), a round at a
    time; ``sample`` draws images from the generator as it stands.

    ``input_shape``, ``scale`` and ``offset`` are the data's (models see ``raw * scale + offset``). Everything random
    is drawn from ``seed`` and the step's number, so the same seed gives the same rounds, whether or not the
    training stopped between them (``state``/``restore`` carry the models and optimizers across).
    """

    def __init__(self, teacher: keras.Model, student: keras.Model, input_shape: Sequence[int], num_classes: int,
                 scale: float = 1 / 255.0, offset: float = 0.0, config: GeneratorConfig | None = None,
                 batch_size: int = 128, seed: int = 0):
        self.teacher, self.student = teacher, student
        self.bn = require_batchnorm(teacher)
        self.config = c = config or GeneratorConfig()
        self.num_classes, self.batch_size, self.seed = int(num_classes), int(batch_size), int(seed)
        self.scale, self.offset = float(scale), float(offset)
        self.generator = build_generator(input_shape, num_classes, c.latent, seed, c.filters)
        self.g_opt = keras.optimizers.Adam(c.learning_rate, beta_1=0.5, beta_2=0.999)
        self.s_opt = keras.optimizers.Adam(c.student_learning_rate)
        self.g_opt.build(self.generator.trainable_variables)
        self.s_opt.build(self.student.trainable_variables)
        self.step = 0  # generator steps taken
        self._g_step = tf.function(self._generator_step)
        self._s_step = tf.function(self._student_step)

    def _draw(self, step, k):
        """(noise, uniformly drawn classes) of iteration ``step``'s batch ``k`` (0: the generator's, then the
        student's): stateless draws whose seed pairs mix the seed, the step and k, a pair of its own for each."""
        s = tf.stack([tf.constant(self.seed, tf.int32), step, k])
        z = tf.random.stateless_normal((self.batch_size, self.config.latent), s[:2] * 7919 + s[1:] + 3)
        y = tf.random.stateless_uniform((self.batch_size,), s[1:] + s[0] * 31 + 11, 0, self.num_classes,
                                        dtype=tf.int32)
        return z, y

    def _inputs(self, raw01):
        return 255.0 * raw01 * self.scale + self.offset

    def _generator_step(self, step):
        c = self.config
        z, y = self._draw(step, 0)
        with tf.GradientTape() as tape:
            raw = self.generator([z, y], training=True)
            x = self._inputs(raw)
            with recording(self.bn) as seen:
                t = self.teacher(x, training=False)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, t))
            bn = bn_statistics_loss(seen)
            gap = tf.reduce_mean(tf.abs(t - self.student(x, training=False)))
            total = ce + c.bn_weight * bn - c.adversarial * gap
            terms = {}
            if c.diversity > 0:
                terms["diversity"] = mode_seeking(raw, z, y)
                total -= c.diversity * terms["diversity"]
        variables = self.generator.trainable_variables
        self.g_opt.apply_gradients(zip(tape.gradient(total, variables), variables))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(t, -1, output_type=tf.int32), y), tf.float32))
        return {"ce": ce, "bn": bn, "gap": gap, "accuracy": accuracy, **terms}

    def _student_step(self, step, k):
        z, y = self._draw(step, k)
        x = self._inputs(self.generator([z, y], training=True))
        t = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(t - self.student(x, training=True)))
        variables = self.student.trainable_variables
        self.s_opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    def train(self, steps: int, callback=None) -> dict:
        """Takes ``steps`` more iterations (a generator step, then the student's); returns the last one's terms.
        ``callback(step, terms)``, when given, is called every ``REPORT_EVERY`` iterations and at the last."""
        terms = {}
        with exact_graphs():
            for i in range(steps):
                step = tf.constant(self.step, tf.int32)
                terms = self._g_step(step)
                for k in range(self.config.student_steps):
                    terms["student_l1"] = self._s_step(step, tf.constant(k + 1, tf.int32))
                self.step += 1
                _report(callback, i, steps, self.step, terms)
        return {k: float(v) for k, v in terms.items()}

    def sample(self, labels, seed: int) -> np.ndarray:
        """Returns uint8 images (N, H, W, C) of the classes ``labels`` from the generator as it stands (its batch
        statistics, whole batches of ``batch_size``: the statistics it was trained with; a short last batch is filled
        up with the first classes again and the extra images dropped)."""
        labels = np.asarray(labels, np.int32)
        n, b = len(labels), self.batch_size
        labels = np.resize(labels, -(-n // b) * b)
        z = tf.random.stateless_normal((len(labels), self.config.latent), [seed, 1])
        out = [self.generator([z[i:i + b], labels[i:i + b]], training=True).numpy() for i in range(0, len(labels), b)]
        return np.round(255.0 * np.concatenate(out)[:n]).astype(np.uint8)

    def _variables(self):
        """Yields (name, variable) of everything the training changes: both models' weights, both optimizers'."""
        for prefix, model, opt in (("g", self.generator, self.g_opt), ("s", self.student, self.s_opt)):
            yield from ((f"{prefix}_w{i}", w) for i, w in enumerate(model.weights))
            yield from ((f"{prefix}_o{i}", v) for i, v in enumerate(opt.variables))

    def state(self) -> dict:
        """Returns the arrays that ``restore`` continues from: the step and ``_variables``' values."""
        return {"step": np.array(self.step), **{name: v.numpy() for name, v in self._variables()}}

    def restore(self, arrays: dict) -> None:
        """Continues from ``state()``'s arrays."""
        self.step = int(arrays["step"])
        for name, v in self._variables():
            v.assign(arrays[name])
