"""The Distiller: objective, frozen teacher, metrics, Keras callbacks, and plain CE training as a special case."""
import numpy as np
import pytest

import models
from edge_kd.distill import Distiller, hinton, losses
from edge_kd.keras import keras, tf
from .np_reference import np_log_softmax

T, ALPHA = 4.0, 0.7
KEYS = {"loss", "student_loss", "hinton", "accuracy"}


@pytest.fixture(scope="module")
def small(mnist):
    """540 training, 200 validation and 200 test images of the shared MNIST slice (short fits)."""
    (x, y), val, (xt, yt) = mnist
    return (x[:540], y[:540]), val, (xt[:200], yt[:200])


def _student(seed=1):
    keras.utils.set_random_seed(seed)
    return models.build("mlp", (28, 28, 1), 10, hidden=(16,))


def _snapshot(model):
    return [w.copy() for w in model.get_weights()]


def _assert_weights_equal(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


class _PerEpochWeights(keras.callbacks.Callback):
    """Records the student's weights at the end of every epoch."""

    def __init__(self, student):
        super().__init__()
        self.student, self.weights = student, []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(_snapshot(self.student))


def test_fit_lowers_hinton_keeps_teacher_frozen_and_checkpoints_the_student(small, teacher, tmp_path):
    (x, y), (xv, yv), (xt, yt) = small
    teacher_before = _snapshot(teacher)
    student = _student()
    d = hinton(student, teacher, alpha=ALPHA, temperature=T)
    assert d.hard_weight == pytest.approx(1 - ALPHA) and d.terms[0].weight == ALPHA
    d.compile(optimizer=keras.optimizers.Adam(3e-3))
    ckpt = tmp_path / "best.keras"
    record = _PerEpochWeights(student)
    hist = d.fit(x, y, batch_size=64, epochs=4, validation_data=(xv, yv), verbose=0, shuffle=False,
                 callbacks=[keras.callbacks.ModelCheckpoint(str(ckpt), monitor="val_loss", save_best_only=True),
                            record]).history

    assert set(hist) == KEYS | {f"val_{k}" for k in KEYS}
    assert all(len(v) == 4 for v in hist.values())
    assert hist["hinton"][-1] < 0.8 * hist["hinton"][0], hist["hinton"]
    assert hist["val_hinton"][-1] < hist["val_hinton"][0], hist["val_hinton"]
    assert hist["accuracy"][-1] > hist["accuracy"][0]
    # The logged total is the weighted sum of the logged terms (the student has no regulariser).
    np.testing.assert_allclose(hist["val_loss"],
                               (1 - ALPHA) * np.array(hist["val_student_loss"]) + ALPHA * np.array(hist["val_hinton"]),
                               rtol=1e-5)

    # Every teacher weight is untouched, and the teacher holds no trainable weights inside the Distiller.
    _assert_weights_equal(teacher.get_weights(), teacher_before)
    assert not teacher.trainable
    assert {id(v) for v in d.trainable_variables} == {id(v) for v in student.trainable_variables}

    # The checkpoint is the student at its best val_loss epoch, loadable on its own.
    best = int(np.argmin(hist["val_loss"]))
    loaded = keras.models.load_model(ckpt, compile=False)
    assert loaded.name == student.name
    _assert_weights_equal(loaded.get_weights(), record.weights[best])
    if best == 3:
        np.testing.assert_array_equal(loaded.predict(xt, verbose=0), d.student.predict(xt, verbose=0))
    else:
        ref = models.build("mlp", (28, 28, 1), 10, hidden=(16,))
        ref.set_weights(record.weights[best])
        np.testing.assert_array_equal(loaded.predict(xt, verbose=0), ref.predict(xt, verbose=0))

    # predict is the student's; evaluate reports the student's numbers, checked against NumPy.
    s_logits = d.predict(xt, batch_size=256, verbose=0)
    assert s_logits.shape == (len(xt), 10)
    np.testing.assert_array_equal(s_logits, student.predict(xt, batch_size=256, verbose=0))
    res = d.evaluate(xt, yt, batch_size=len(xt), return_dict=True, verbose=0)
    assert set(res) == KEYS
    t_logits = teacher.predict(xt, verbose=0)
    ce = -np_log_softmax(s_logits)[np.arange(len(yt)), yt].mean()
    lt, ls = np_log_softmax(t_logits / T), np_log_softmax(s_logits / T)
    soft = T * T * (np.exp(lt) * (lt - ls)).sum(-1).mean()
    np.testing.assert_allclose(res["student_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(res["hinton"], soft, rtol=1e-5)
    np.testing.assert_allclose(res["loss"], (1 - ALPHA) * ce + ALPHA * soft, rtol=1e-5)
    np.testing.assert_allclose(res["accuracy"], (s_logits.argmax(-1) == yt).mean(), atol=1e-7)
    # Over batches with a short last one (200 = 3 × 64 + 8), the figures are still per-sample means.
    ragged = d.evaluate(xt, yt, batch_size=64, return_dict=True, verbose=0)
    for key in KEYS:
        np.testing.assert_allclose(ragged[key], res[key], rtol=1e-5, err_msg=key)
    _assert_weights_equal(teacher.get_weights(), teacher_before)


def test_early_stopping_restores_the_best_student(small, teacher):
    (x, y), (xv, yv), _ = small
    teacher_before = _snapshot(teacher)
    student = _student(seed=2)
    d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=2.0, weight=0.5)], hard_weight=0.5)
    d.compile(optimizer=keras.optimizers.Adam(3e-3))
    record = _PerEpochWeights(student)
    # min_delta is huge, so no epoch after the first counts as better: it stops after epoch 2 and restores epoch 1.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=100.0, restore_best_weights=True)
    hist = d.fit(x, y, batch_size=64, epochs=5, validation_data=(xv, yv), verbose=0, callbacks=[record, stop]).history
    assert len(hist["loss"]) == 2 and stop.stopped_epoch == 1
    assert not all(np.array_equal(a, b) for a, b in zip(record.weights[0], record.weights[1]))
    _assert_weights_equal(student.get_weights(), record.weights[0])
    _assert_weights_equal(teacher.get_weights(), teacher_before)


def test_save_weights_round_trips_the_student(small, teacher, tmp_path):
    _, _, (xt, _) = small
    d = hinton(_student(seed=3), teacher)
    path = tmp_path / "student.weights.h5"
    d.save_weights(str(path))
    other = hinton(_student(seed=4), teacher)
    other.load_weights(str(path))
    np.testing.assert_array_equal(other.predict(xt, verbose=0), d.predict(xt, verbose=0))


def test_no_teacher_no_terms_is_plain_cross_entropy_training(small):
    (x, y), (xv, yv), _ = small
    a, b = _student(seed=5), _student(seed=6)
    b.set_weights(a.get_weights())
    d = Distiller(a)
    assert d.teacher is None and d.terms == []
    d.compile(optimizer=keras.optimizers.SGD(0.1))
    b.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    hd = d.fit(x, y, batch_size=64, epochs=2, validation_data=(xv, yv), shuffle=False, verbose=0).history
    hb = b.fit(x, y, batch_size=64, epochs=2, validation_data=(xv, yv), shuffle=False, verbose=0).history
    assert set(hd) == {"loss", "student_loss", "accuracy", "val_loss", "val_student_loss", "val_accuracy"}
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(hd[key], hb[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(hd["student_loss"], hd["loss"], rtol=1e-6)
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    # And training did happen.
    assert hd["loss"][-1] < hd["loss"][0]


def test_student_regularisation_losses_join_the_training_objective():
    inp = keras.Input((4,))
    dense = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.l2(0.5), use_bias=False)
    student = keras.Model(inp, dense(inp))
    kernel = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    dense.set_weights([kernel])
    d = Distiller(student)
    x = np.ones((2, 4), np.float32)
    y = np.array([0, 2])
    logits = x @ kernel
    ce = -np_log_softmax(logits)[np.arange(2), y].mean()
    _, _, total_train, hard, _, _ = d._compute_losses(tf.constant(x), tf.constant(y), training=True)
    _, _, total_eval, _, _, _ = d._compute_losses(tf.constant(x), tf.constant(y), training=False)
    np.testing.assert_allclose(float(hard), ce, rtol=1e-5)
    np.testing.assert_allclose(float(total_eval), ce, rtol=1e-5)
    np.testing.assert_allclose(float(total_train), ce + 0.5 * np.square(kernel).sum(), rtol=1e-5)
