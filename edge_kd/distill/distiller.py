"""The Distiller: a Keras model that trains a student from a frozen teacher.

>>> from edge_kd.keras import keras
>>> from edge_kd.distill import Distiller, losses
>>> import models
>>> teacher = models.build("cnn", (28, 28, 1), 10)
>>> student = models.build("mlp", (28, 28, 1), 10, hidden=(32,))
>>> d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=4.0, weight=0.9)], hard_weight=0.1)
>>> d.compile(optimizer=keras.optimizers.Adam(1e-3))
>>> # d.fit(train_ds, validation_data=val_ds, epochs=3); d.student is the trained student

``call`` is the student's call, so ``evaluate``/``predict`` and callbacks see the student; ``save``
and ``save_weights`` save the student, so a stock ``ModelCheckpoint`` checkpoints the student.
"""
from __future__ import annotations

from typing import Sequence

from edge_kd.distill import losses as losses_mod
from edge_kd.keras import keras, tf


class Distiller(keras.Model):
    """Trains ``student`` on ``hard_weight · CE(y, s) + Σ term.weight · term(s, t, y)`` with ``teacher`` frozen.

    Every term is reported as a metric named after it (``hinton``), beside ``loss`` (the total),
    ``student_loss`` (the cross-entropy) and the compiled metrics on the student's logits.
    """

    def __init__(self, student: keras.Model, teacher: keras.Model | None = None,
                 terms: Sequence[losses_mod.LossTerm] = (), hard_weight: float = 1.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "distiller"), **kwargs)
        if terms and teacher is None:
            raise ValueError("distillation terms need a teacher")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"each loss term may appear once, got {names}")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.terms = list(terms)
        self.hard_weight = float(hard_weight)
        self._ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._loss_tracker = keras.metrics.Mean(name="loss")
        self._hard_tracker = keras.metrics.Mean(name="student_loss")
        self._term_trackers = [keras.metrics.Mean(name=n) for n in names]

    def compile(self, optimizer="adam", metrics=None, **kwargs):
        """Compiles with ``optimizer``; metrics default to the student's sparse top-1 accuracy."""
        if metrics is None:
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    @property
    def metrics(self):
        tracked = [self._loss_tracker, self._hard_tracker, *self._term_trackers]
        if self.compiled_metrics is not None:
            tracked += self.compiled_metrics.metrics
        return tracked

    def _compute_losses(self, x, y, training):
        s_logits = self.student(x, training=training)
        hard = self._ce(y, s_logits)
        total = self.hard_weight * hard
        values = []
        if self.terms:
            t_logits = tf.stop_gradient(self.teacher(x, training=False))
            student = {"logits": s_logits}
            teacher = {"logits": t_logits}
            for term in self.terms:
                v = term(student, teacher, y)
                values.append(v)
                total = total + term.weight * v
        if training and self.student.losses:
            total = total + tf.add_n(self.student.losses)
        return s_logits, total, hard, values

    def _update(self, y, s_logits, total, hard, values):
        # Weighted by batch size, as Keras weights its own loss, so an epoch's figure is the per-sample mean
        # even when the last batch is short.
        n = tf.cast(tf.shape(s_logits)[0], tf.float32)
        self._loss_tracker.update_state(total, sample_weight=n)
        self._hard_tracker.update_state(hard, sample_weight=n)
        for tracker, v in zip(self._term_trackers, values):
            tracker.update_state(v, sample_weight=n)
        self.compiled_metrics.update_state(y, s_logits)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            s_logits, total, hard, values = self._compute_losses(x, y, training=True)
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return self._update(y, s_logits, total, hard, values)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        s_logits, total, hard, values = self._compute_losses(x, y, training=False)
        return self._update(y, s_logits, total, hard, values)

    def save(self, filepath, *args, **kwargs):
        """Saves the student (the model a user deploys), not the teacher."""
        return self.student.save(filepath, *args, **kwargs)

    def save_weights(self, filepath, *args, **kwargs):
        """Saves the student's weights."""
        return self.student.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """Loads weights saved by ``save_weights`` into the student."""
        return self.student.load_weights(filepath, *args, **kwargs)


def hinton(student: keras.Model, teacher: keras.Model, alpha: float = 0.9, temperature: float = 4.0) -> Distiller:
    """Returns a Distiller with loss ``(1 - alpha) · CE + alpha · T² · KL(softmax(t/T) ‖ softmax(s/T))``."""
    alpha = losses_mod._check_range("alpha", alpha, 0.0, 1.0)
    term = losses_mod.get("hinton", temperature=temperature, weight=alpha)
    return Distiller(student, teacher, terms=[term], hard_weight=1.0 - alpha)
