"""The Distiller: a Keras model that trains a student from frozen teachers, its own mean, or its peers.

>>> from edge_kd.keras import keras
>>> from edge_kd.distill import Distiller, losses
>>> import models
>>> teacher = models.build("cnn", (28, 28, 1), 10)
>>> student = models.build("mlp", (28, 28, 1), 10, hidden=(32,))
>>> d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=4.0, weight=0.9)], hard_weight=0.1)
>>> d.compile(optimizer=keras.optimizers.Adam(1e-3))
>>> # d.fit(train_ds, validation_data=val_ds, epochs=3); d.student is the trained student

Where the knowledge comes from (one of):

- ``teacher``: one frozen model, or a list of them (multi-teacher; ``teacher_weights`` and ``combine``);
- ``ema_decay``: a mean teacher, the exponential moving average of the student's own weights;
- ``peers``: online mutual learning (DML): the student and its peers train together, each distilling
  from the others; no pretrained teacher;
- nothing, with terms that need no teacher (``virtual_teacher``: teacher-free KD).

``call`` is the student's call, so ``evaluate``/``predict`` and callbacks see the student; ``save``
and ``save_weights`` save the student, so a stock ``ModelCheckpoint`` checkpoints the student. The
terms' own variables (FitNet adapters, CRD heads) train with the student and are never saved with it.
"""
from __future__ import annotations

from typing import Sequence

from edge_kd import augment as augment_mod
from edge_kd import keras3
from edge_kd.distill import taps as taps_mod
from edge_kd.distill.options import COMBINE
from edge_kd.distill.registry import LossTerm, check_range
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf


class KnowledgeError(UserError, ValueError):
    """Terms and sources of knowledge that do not fit together (a ValueError to the Python API, a one-line
    UserError to the pipeline). ``key`` is the argument at fault where one is (``combine``, ``teacher_weights``):
    the recipe's ``distillation`` section has keys of the same names."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key} {message}" if key else message)
        self.key = key


def check_knowledge(terms: Sequence[LossTerm], teachers: int, teacher_weights=None, combine: str = "fixed",
                    mean_teacher: bool = False, peers: int = 0) -> None:
    """Raises a KnowledgeError where ``terms`` cannot learn from ``teachers`` teachers (weighed by
    ``teacher_weights`` and ``combine``), a mean teacher or ``peers`` peers: the one place of these rules, read by
    the Distiller and, before anything trains, by the recipe."""
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise KnowledgeError(f"each loss term may appear once, got {names}")
    sources = sum([teachers > 0, bool(mean_teacher), peers > 0])
    if sources > 1:
        raise KnowledgeError("give one source of knowledge: teacher(s), ema_decay (mean teacher) or peers (DML)")
    if combine not in COMBINE:
        raise KnowledgeError(f"must be one of {', '.join(COMBINE)}, got {combine!r}", key="combine")
    if any(t.needs_teacher for t in terms) and not sources:
        raise KnowledgeError("distillation terms need a teacher (or ema_decay, or peers)")
    if peers and not all(t.reads_only_logits() for t in terms):
        raise KnowledgeError("with peers (mutual learning) only terms on logits may be used (hinton, dkd, rkd "
                             "without layers, virtual_teacher), got "
                             + ", ".join(t.name for t in terms if not t.reads_only_logits()))
    if teacher_weights is not None:
        w = [float(v) for v in teacher_weights]
        if len(w) != teachers or any(v < 0 for v in w) or sum(w) <= 0:
            raise KnowledgeError(f"must be {teachers} non-negative numbers with a positive sum (one per teacher, in "
                                 f"order: in a recipe the teacher, then extra_teachers), got {list(teacher_weights)!r}",
                                 key="teacher_weights")


class _Progress(keras.callbacks.Callback):
    """Tells the Distiller the steps per epoch of this fit, so ``train_step`` knows the fractional epoch.

    Only fit-level hooks: a per-batch hook would make Keras copy the logs to NumPy after every step.
    """

    def __init__(self, distiller):
        super().__init__()
        self._distiller = distiller

    def on_train_begin(self, logs=None):
        self._distiller._steps_per_epoch.assign(float((self.params or {}).get("steps") or 0))

    def on_epoch_begin(self, epoch, logs=None):
        self._distiller._epochs_begun.assign(float(epoch))


class Distiller(keras.Model):
    """Trains ``student`` on ``hard_weight · CE(y, s) + Σ term.weight · term(s, t, y)``.

    Every term is reported as a metric named after it (``hinton``), beside ``loss`` (the student's
    total), ``student_loss`` (its cross-entropy), the compiled metrics on the student's logits and,
    with peers, ``peer_loss`` (the mean of the peers' totals).

    With several teachers, a term that reads teacher layers or owns variables (fitnet, at, crd, or
    any term given layer names) distils from the first teacher only; every other term (hinton, dkd,
    rkd on logits) distils from each teacher and the values are combined with the teachers'
    weights: ``fixed`` (``teacher_weights``, normalised; equal by default) or ``confidence``, per
    example, the softmax over teachers of minus each teacher's cross-entropy on the true label
    (Zhang et al. 2022, CA-MKD). Terms with one value per example are weighted per example; the
    others by the batch mean of the weights.

    With ``peers`` (DML, Zhang et al. 2018), the student and each peer minimise their own
    ``hard_weight · CE + Σ term.weight · mean over the others of term(self, other)``, the others'
    logits held constant; only logit terms without variables may be used.

    ``augment`` (an ``edge_kd.augment.Augmenter``) gives each training step's batch its random view and,
    if set, MixUp or CutMix; test steps and ``call`` never augment. With ``consistent`` (the default)
    the teachers see exactly that batch; with ``consistent=False`` they see the unaugmented images and
    their outputs are mixed with the batch's λ, like the labels. Batches whose inputs are
    ``{"image": x, "teacher_logits": (batch, teachers, classes)}`` (``DataBundle.dataset(...,
    teacher_logits=...)``, see ``teacher_logits``) give the fixed-view teachers' logits without running
    them. ``label_smoothing`` smooths the cross-entropy's labels.

    Under a ``tf.distribute`` strategy with several replicas (``MirroredStrategy`` on the GPUs of one
    host, ``MultiWorkerMirroredStrategy`` across hosts; build the student, the teachers and the
    Distiller inside ``strategy.scope()``), each replica scales its mean loss by its share of the global
    batch, so the summed gradient is that of the global batch's mean; the metrics are Keras metrics,
    which aggregate across replicas; each replica draws its own augmentation. Terms over the batch's
    pairs or negatives (rkd, crd with ``bank_size: 0``) see each replica's share of the batch, not the
    global batch. A mean teacher and CRD's memory bank keep per-step state the replicas would write
    apart, so they are refused there. Batch the training data with ``drop_remainder=True``: a short
    last batch can leave a replica no examples, and batch normalisation NaN statistics.
    Under the ``mixed_float16`` or ``mixed_bfloat16`` Keras policy the models compute in 16 bits while every loss
    term and metric is computed in float32; under ``mixed_float16`` ``compile`` wraps the optimizer in a
    LossScaleOptimizer (bfloat16 has float32's range and needs none).

    Sample weights (``fit(..., sample_weight=w)``, ``class_weight={...}``, or ``(x, y, w)`` batches)
    weigh each example in the cross-entropy and in every term with one value per example, as Keras
    weighs a loss: ``Σ_i w_i · l_i / batch``. As in Keras, ``compile(weighted_metrics=[...])`` are
    weighted and ``metrics`` (the default accuracy) are not. A term whose value is not a mean over
    examples (``rkd``, which compares pairs and triplets) refuses them.
    """

    def __init__(self, student: keras.Model, teacher=None, terms: Sequence[LossTerm] = (),
                 hard_weight: float = 1.0, *, teacher_weights: Sequence[float] | None = None,
                 combine: str = "fixed", ema_decay: float | None = None, peers: Sequence[keras.Model] = (),
                 augment=None, consistent: bool = True, label_smoothing: float = 0.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "distiller"), **kwargs)
        names = [t.name for t in terms]
        teachers = list(teacher) if isinstance(teacher, (list, tuple)) else ([] if teacher is None else [teacher])
        peers = list(peers)
        check_knowledge(terms, len(teachers), teacher_weights, combine, ema_decay is not None, len(peers))
        # a Keras 3 teacher (``import keras``) is rebuilt as its tf_keras twin, checked to give the same outputs
        teachers = [keras3.to_tf_keras(t, f"teacher '{t.name}'") if keras3.is_keras3_model(t) else t for t in teachers]
        self.student = student
        self.hard_weight = float(hard_weight)
        self.augment = augment
        self.consistent = bool(consistent)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        self.terms = list(terms)
        self.combine = combine
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        if self.ema_decay is not None:
            if not 0.0 <= self.ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
            teachers = [_copy_of(student)]
        self.teachers = teachers
        for t in self.teachers:
            t.trainable = False
        self.peers = peers
        w = [1.0] * len(self.teachers) if teacher_weights is None else [float(v) for v in teacher_weights]
        self.teacher_weights = [v / sum(w) for v in w] if self.teachers else []

        s_taps = list(dict.fromkeys(n for t in self.terms for n in t.student_taps()))
        t_taps = list(dict.fromkeys(n for t in self.terms for n in t.teacher_taps()))
        self._student_net = taps_mod.tap_model(student, s_taps) if s_taps else student
        self._s_taps = s_taps
        self._teacher_net = taps_mod.tap_model(self.teachers[0], t_taps) if (t_taps and self.teachers) else None
        self._t_taps = t_taps
        self._steps_per_epoch = tf.Variable(0.0, trainable=False, name="steps_per_epoch")
        self._epochs_begun = tf.Variable(0.0, trainable=False, name="epochs_begun")

        self._loss_tracker = keras.metrics.Mean(name="loss")
        self._hard_tracker = keras.metrics.Mean(name="student_loss")
        self._term_trackers = [keras.metrics.Mean(name=n) for n in names]
        self._peer_tracker = keras.metrics.Mean(name="peer_loss") if peers else None
        self._check_distributable()
        self._build_terms()

    @property
    def teacher(self):
        """The (first) teacher, the mean teacher, or None."""
        return self.teachers[0] if self.teachers else None

    # -- the pieces of a step ------------------------------------------------------------------------
    def _build_terms(self):
        """Builds the terms' variables eagerly, on a zero batch of two, before any tf.function traces."""
        if not self.terms:
            return
        shape = getattr(self.student, "input_shape", None)
        if not isinstance(shape, tuple) or any(d is None for d in shape[1:]):
            raise ValueError("distillation terms need a student with a known input shape (a Functional model)")
        x = tf.zeros((2, *shape[1:]), self.student.inputs[0].dtype)
        student, teachers = self._forward(x, training=False)
        for term in self.terms:
            term.build(student, teachers[0] if teachers else None)

    def epoch(self) -> tf.Tensor:
        """Returns the epochs completed in the current fit, fractional within an epoch (float32 scalar)."""
        steps = self._steps_per_epoch
        done = tf.cast(self._train_counter, tf.float32)
        return tf.where(steps > 0, done / tf.maximum(steps, 1.0), self._epochs_begun)

    def _forward(self, x, training, teacher_x=None, cached=None, mixing=None):
        """Returns the student dict and one dict per source of knowledge (teachers or peers).

        The teachers see ``teacher_x`` (default ``x``) or, with ``cached`` (batch, teachers, classes), give
        those logits without running; when they did not see the student's mixed batch, their outputs are
        mixed with the batch's ``mixing`` (permutation, λ), as the labels are.
        """
        out = self._student_net(x, training=training)
        student = _float32(self._as_dict(out, self._s_taps))  # every loss term in float32, under mixed precision too
        student["epoch"] = self.epoch()
        if cached is not None:
            teachers = [{"logits": cached[:, k], "features": {}} for k in range(len(self.teachers))]
        else:
            teachers = self._teach(x if teacher_x is None else teacher_x)
        if mixing is not None and (cached is not None or teacher_x is not None):
            teachers = [augment_mod.mix(t, *mixing) for t in teachers]
        return student, [tf.nest.map_structure(tf.stop_gradient, t) for t in teachers]

    def _teach(self, x):
        """Returns one dict per teacher of its outputs on ``x`` (logits, and the tapped layers of the first), in
        float32 whatever the teacher computes in: what mixes, stacks or enters a loss term never sees 16 bits."""
        teachers = []
        for i, t in enumerate(self.teachers):
            if i == 0 and self._teacher_net is not None:
                teachers.append(_float32(self._as_dict(self._teacher_net(x, training=False), self._t_taps)))
            else:
                teachers.append(_float32({"logits": t(x, training=False), "features": {}}))
        return teachers

    def teacher_logits(self, x) -> tf.Tensor:
        """Returns the teachers' logits of ``x`` as (batch, teachers, classes): what a teacher cache holds."""
        return tf.stack([t["logits"] for t in self._teach(x)], axis=1)

    def uses_cache(self) -> bool:
        """Returns whether a teacher cache can stand in for the teachers: fixed view, frozen teachers, logit terms."""
        return (not self.consistent and bool(self.teachers) and self.ema_decay is None
                and all(t.reads_only_logits() for t in self.terms))

    @staticmethod
    def _as_dict(out, names):
        if not names:
            return {"logits": out, "features": {}}
        return {"logits": out[0], "features": dict(zip(names, out[1:]))}

    def _weights(self, teachers, y):
        """Returns each teacher's weight per example, (teachers, batch)."""
        n = tf.shape(teachers[0]["logits"])[0]
        if self.combine == "fixed" or len(teachers) == 1:
            return tf.stack([tf.fill([n], w) for w in self.teacher_weights])
        ce = tf.stack([keras.losses.sparse_categorical_crossentropy(y, tf.cast(t["logits"], tf.float32),
                                                                    from_logits=True) for t in teachers])
        return tf.nn.softmax(-ce, axis=0)

    @staticmethod
    def _reduce(term, student, teacher, y, sw):
        """Returns the term's batch value, each example weighted by ``sw`` when given."""
        if sw is None:
            return term(student, teacher, y)
        return tf.reduce_mean(sw * term.per_sample(student, teacher, y))

    def _term_value(self, term, student, teachers, weights, y, sw):
        if not term.needs_teacher:
            return self._reduce(term, student, None, y, sw)
        if not term.reads_only_logits():  # layers or variables of one teacher: the first (class docstring)
            return self._reduce(term, student, teachers[0], y, sw)
        total = 0.0
        for k, t in enumerate(teachers):
            if term.has_per_sample:
                w = weights[k] if sw is None else weights[k] * sw
                total += tf.reduce_mean(w * term.per_sample(student, t, y))
            else:
                total += tf.reduce_mean(weights[k]) * term(student, t, y)
        return total

    def _cross_entropy(self, y, logits, sw):
        """Returns the batch's cross-entropy with the labels ``y``, smoothed by ``label_smoothing``, weighted by ``sw``."""
        logits = tf.cast(logits, tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.reshape(tf.cast(y, tf.int32), [-1]), logits)
        if self.label_smoothing:
            uniform = -tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1)
            ce = (1.0 - self.label_smoothing) * ce + self.label_smoothing * uniform
        return tf.reduce_mean(ce if sw is None else sw * ce)

    def _hard(self, y, logits, sw, mixing):
        """Returns the hard loss; for a mixed batch ``λ · CE(y) + (1 − λ) · CE(y[π])``."""
        if mixing is None:
            return self._cross_entropy(y, logits, sw)
        perm, lam = mixing
        other_sw = None if sw is None else tf.gather(sw, perm)
        return lam * self._cross_entropy(y, logits, sw) + (1.0 - lam) * self._cross_entropy(
            tf.gather(y, perm), logits, other_sw)

    def _objective(self, student, teachers, y, sw, weights, losses, mixing=None):
        """Returns (total, hard, term values) of one model distilling from ``teachers``."""
        hard = self._hard(y, student["logits"], sw, mixing)
        if mixing is not None:  # the terms see the label of the image that covers more of the mix
            perm, lam = mixing
            y = self._dominant(y, mixing)
            sw = None if sw is None else lam * sw + (1.0 - lam) * tf.gather(sw, perm)
        total = self.hard_weight * hard
        values = []
        for term in self.terms:
            v = self._term_value(term, student, teachers, weights, y, sw)
            values.append(v)
            total = total + term.weight * v
        if losses:
            total = total + tf.add_n(losses)
        return total, hard, values

    def unweighable_terms(self) -> list[str]:
        """Returns the names of the terms that cannot weigh examples (no value per example)."""
        return [t.name for t in self.terms if not t.has_per_sample]

    def _check_weighable(self):
        bad = self.unweighable_terms()
        if bad:
            raise ValueError(f"sample_weight/class_weight: the term(s) {', '.join(bad)} cannot weigh examples (their "
                             f"value is not a mean over examples: rkd compares pairs and triplets); remove the "
                             f"weights or the term")

    def _compute_losses(self, x, y, training, sw=None, teacher_x=None, cached=None, mixing=None):
        student, teachers = self._forward(x, training, teacher_x=teacher_x, cached=cached, mixing=mixing)
        extra = self.student.losses if training else []
        if sw is not None:
            self._check_weighable()  # at trace time; fit() checks before training starts
            sw = tf.reshape(tf.cast(sw, tf.float32), [-1])
        if not self.peers:
            weights = self._weights(teachers, self._dominant(y, mixing)) if teachers else None
            total, hard, values = self._objective(student, teachers, y, sw, weights, extra, mixing)
            return student, teachers, total, hard, values, None
        # Mutual learning: every model learns from the others' current predictions, held constant.
        models = [student] + [{"logits": _float32(p(x, training=training)), "features": {}, "epoch": student["epoch"]}
                              for p in self.peers]
        frozen = [tf.nest.map_structure(tf.stop_gradient, {"logits": m["logits"], "features": {}}) for m in models]
        others = lambda k: [f for j, f in enumerate(frozen) if j != k]  # noqa: E731
        n = len(models) - 1
        even = tf.fill([n, tf.shape(y)[0]], 1.0 / n)
        total, hard, values = self._objective(student, others(0), y, sw, even, extra, mixing)
        peer_totals = []
        for k, peer in enumerate(self.peers, start=1):
            pt, _, _ = self._objective(models[k], others(k), y, sw, even, peer.losses if training else [], mixing)
            peer_totals.append(pt)
        return student, teachers, total, hard, values, tf.add_n(peer_totals) / len(peer_totals)

    @staticmethod
    def _dominant(y, mixing):
        """Returns, per example, the label of the image that covers more of a mixed one (``y`` if unmixed)."""
        if mixing is None:
            return y
        perm, lam = mixing
        return tf.where(lam >= 0.5, y, tf.gather(y, perm))

    def _split_inputs(self, x):
        """Returns ``(images, cached teacher logits or None)`` of a batch's inputs (``DataBundle.dataset(...,
        teacher_logits=...)`` gives ``{"image", "teacher_logits"}``)."""
        if isinstance(x, dict):
            return x["image"], x.get("teacher_logits")
        return x, None

    def _update(self, y, sw, s_logits, total, hard, values, peer_total):
        # Weighted by batch size, as Keras weights its own loss, so an epoch's figure is the per-sample mean
        # even when the last batch is short.
        n = tf.cast(tf.shape(s_logits)[0], tf.float32)

        def seen(v):  # a replica given no examples (a short last batch) has a NaN mean that must weigh nothing
            return tf.where(n > 0, v, tf.zeros_like(v))

        self._loss_tracker.update_state(seen(total), sample_weight=n)
        self._hard_tracker.update_state(seen(hard), sample_weight=n)
        for tracker, v in zip(self._term_trackers, values):
            tracker.update_state(seen(v), sample_weight=n)
        if self._peer_tracker is not None:
            self._peer_tracker.update_state(seen(peer_total), sample_weight=n)
        self.compiled_metrics.update_state(y, s_logits, sample_weight=sw)
        return {m.name: m.result() for m in self.metrics}

    # -- Keras API -----------------------------------------------------------------------------------
    def compile(self, optimizer="adam", metrics=None, **kwargs):
        """Compiles with ``optimizer``; metrics default to the student's sparse top-1 accuracy."""
        if metrics is None:
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras ``fit``, keeping ``epoch()`` (read by terms with a warm-up) current."""
        x = args[0] if args else kwargs.get("x")
        weighted = (kwargs.get("sample_weight") is not None or bool(kwargs.get("class_weight"))
                    or (isinstance(x, tf.data.Dataset) and isinstance(x.element_spec, tuple)
                        and len(x.element_spec) == 3))
        if weighted:
            self._check_weighable()
        return super().fit(*args, callbacks=[_Progress(self), *(callbacks or [])], **kwargs)

    def call(self, inputs, training=None):
        return self.student(self._split_inputs(inputs)[0], training=training)

    @property
    def metrics(self):
        tracked = [self._loss_tracker, self._hard_tracker, *self._term_trackers]
        if self._peer_tracker is not None:
            tracked.append(self._peer_tracker)
        if self.compiled_metrics is not None:
            tracked += self.compiled_metrics.metrics
        return tracked

    def checkpoint_objects(self) -> dict:
        """Returns what a fit's state holds beside the optimizer (``edge_kd.train``'s epoch checkpoints): the
        student and the peers as whole objects (random-number state of their layers included), the terms'
        variables and a mean teacher; never a frozen teacher, which training does not change."""
        objects = {"student": self.student, "peers": list(self.peers),
                   "terms": [v for t in self.terms for v in t.variables()]}
        if self.ema_decay is not None:
            objects["mean_teacher"] = self.teachers[0]
        return objects

    def trained_variables(self) -> list:
        """The variables one step updates: the student's, the peers' and the terms' own (never the teachers')."""
        found = list(self.student.trainable_variables)
        for p in self.peers:
            found += p.trainable_variables
        for t in self.terms:
            found += t.trainable_variables
        return found

    def train_step(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        x, cached = self._split_inputs(x)
        if cached is not None and not self.uses_cache():
            raise ValueError("cached teacher logits need consistent=False, frozen teachers and terms on logits only")
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group if replicas > 1 else None
        view, mixing = (x, None) if self.augment is None else self.augment(x, self._train_counter, replica)
        # Consistent teaching: the teachers see the student's view. A fixed view: the unaugmented images.
        teacher_x = None if (self.consistent or cached is not None) else x
        with tf.GradientTape() as tape:
            student, teachers, total, hard, values, peer_total = self._compute_losses(
                view, y, training=True, sw=sw, teacher_x=teacher_x, cached=cached, mixing=mixing)
            objective = total if peer_total is None else total + peer_total * len(self.peers)
            if replicas > 1:
                objective = objective * self._share_of_global_batch(x)
        # minimize, not apply_gradients: under mixed_float16 the optimizer is a LossScaleOptimizer, and
        # minimize scales the loss and unscales the gradients
        self.optimizer.minimize(objective, self.trained_variables(), tape=tape)
        for term in self.terms:
            term.after_train_step(student, teachers[0] if teachers else None, y)
        if self.ema_decay is not None:
            self._update_mean_teacher()
        return self._update(self._dominant(y, mixing), sw, student["logits"], total, hard, values, peer_total)

    def test_step(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        x, cached = self._split_inputs(x)
        student, _, total, hard, values, peer_total = self._compute_losses(x, y, training=False, sw=sw, cached=cached)
        return self._update(y, sw, student["logits"], total, hard, values, peer_total)

    @staticmethod
    def _share_of_global_batch(x) -> tf.Tensor:
        """Returns this replica's examples over the global batch's: scaling each replica's mean loss by it makes
        the all-reduced (summed) gradient that of the mean over the global batch, short last batches included."""
        n = tf.cast(tf.shape(x)[0], tf.float32)
        return n / tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, n)

    def _check_distributable(self):
        """Refuses, in a multi-replica strategy, what keeps per-step state that replicas would write apart."""
        if tf.distribute.get_strategy().num_replicas_in_sync <= 1:
            return
        if self.ema_decay is not None:
            raise ValueError("a mean teacher (ema_decay) is updated inside each step, which this Distiller does not "
                             "do across replicas; train it on one device (training.strategy: none)")
        banked = [t.name for t in self.terms if getattr(t, "bank_size", 0)]
        if banked:
            raise ValueError(f"{', '.join(banked)} with a memory bank (bank_size > 0) enqueues each replica's batch "
                             "into one FIFO, which replicas would write apart; use bank_size: 0 (in-batch "
                             "negatives) or train on one device (training.strategy: none)")

    def _update_mean_teacher(self):
        """teacher ← decay · teacher + (1 − decay) · student for trained weights; other state is copied."""
        d = self.ema_decay
        trainable = {id(v) for v in self.student.trainable_variables}
        for mean, current in zip(self.teachers[0].weights, self.student.weights):
            if id(current) in trainable:
                mean.assign(d * mean + (1.0 - d) * tf.cast(current, mean.dtype))
            else:
                mean.assign(tf.cast(current, mean.dtype))

    def save(self, filepath, *args, **kwargs):
        """Saves the student (the model a user deploys), not the teacher."""
        return self.student.save(filepath, *args, **kwargs)

    def save_weights(self, filepath, *args, **kwargs):
        """Saves the student's weights."""
        return self.student.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """Loads weights saved by ``save_weights`` into the student."""
        return self.student.load_weights(filepath, *args, **kwargs)


def _float32(outputs: dict) -> dict:
    """Returns the model outputs with float16 and bfloat16 tensors cast to float32 (a model under a mixed policy
    computes in 16 bits)."""
    return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32) if t.dtype in (tf.float16, tf.bfloat16) else t,
                                 outputs)


def _copy_of(model: keras.Model) -> keras.Model:
    """Returns an independent copy of ``model`` with its weights (tfmot wrappers included), for a mean teacher."""
    from edge_kd.tfmot import common, qat

    with qat.scope(common.custom_objects(model)):
        copy = common.clone_with(model)  # rebuilds every layer holding a copy of its weights
    if len(copy.weights) != len(model.weights):  # _update_mean_teacher pairs them up one by one
        raise ValueError(f"the mean teacher's copy of '{model.name}' has {len(copy.weights)} weights, the "
                         f"student {len(model.weights)}")
    return copy


def alpha_weights(alpha: float) -> tuple[float, float]:
    """Returns ``(hard_weight, soft_weight) = (1 − alpha, alpha)``; alpha outside [0, 1] is a UserError."""
    alpha = check_range("alpha", alpha, 0.0, 1.0)
    return 1.0 - alpha, alpha
