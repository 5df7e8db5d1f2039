"""Sample weights and class weights in the Distiller: the hard loss and every per-example term weigh each example
as Keras weighs a loss (sum of w_i · l_i over the batch size), and weighted_metrics are weighted, checked against
NumPy; a term with no value per example (rkd) refuses them before training."""
import numpy as np
import pytest

import models
from edge_kd.distill import Distiller, losses
from edge_kd.keras import keras, tf

from .np_reference import np_kl, np_log_softmax

K, B = 10, 12


def _student(seed=1):
    keras.utils.set_random_seed(seed)
    return models.build("cnn", (28, 28, 1), 10, filters=(4, 8))


@pytest.fixture(scope="module")
def batch(mnist):
    (x, y), _, _ = mnist
    w = np.random.default_rng(7).uniform(0.0, 3.0, B).astype(np.float32)
    w[2] = 0.0  # an example that does not count at all
    return x[:B], y[:B], w


def test_hard_loss_hinton_and_accuracy_are_weighted_as_numpy_says(batch, teacher):
    x, y, w = batch
    T, alpha = 4.0, 0.6
    student = _student()
    d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=T, weight=alpha)], hard_weight=1 - alpha)
    d.compile(weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="weighted_accuracy")])
    res = d.evaluate(x, y, sample_weight=w, batch_size=B, return_dict=True, verbose=0)
    s = student.predict(x, verbose=0)
    t = teacher.predict(x, verbose=0)
    ce = -np_log_softmax(s)[np.arange(B), y]
    soft = T * T * np_kl(t, s, T)
    np.testing.assert_allclose(res["student_loss"], np.sum(w * ce) / B, rtol=1e-5)
    np.testing.assert_allclose(res["hinton"], np.sum(w * soft) / B, rtol=1e-5)
    np.testing.assert_allclose(res["loss"], (1 - alpha) * np.sum(w * ce) / B + alpha * np.sum(w * soft) / B, rtol=1e-5)
    # as in Keras, `metrics` are not weighted and `weighted_metrics` are: a weighted mean, divided by the weights' sum
    correct = s.argmax(1) == y
    np.testing.assert_allclose(res["accuracy"], correct.mean(), rtol=1e-6)
    np.testing.assert_allclose(res["weighted_accuracy"], np.sum(w * correct) / np.sum(w), rtol=1e-6)
    unweighted = d.evaluate(x, y, batch_size=B, return_dict=True, verbose=0)
    np.testing.assert_allclose(unweighted["hinton"], soft.mean(), rtol=1e-5)


TERMS = {
    "dkd": {"warmup_epochs": 0.0, "beta": 2.0},
    "virtual_teacher": {"temperature": 4.0},
    "at": {"pairs": [["block1_relu", "block1_relu"], ["block2_relu", "block2_relu"]]},
    "fitnet": {"student_layer": "block2_relu", "teacher_layer": "block2_relu"},
    "crd": {"student_layer": "flatten", "teacher_layer": "flatten", "dim": 16, "bank_size": 32},
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_per_example_term_weighs_each_example(name, batch, teacher):
    """The weighted batch value is Σ w_i · v_i / B, with v_i the term's value of example i alone."""
    x, y, w = batch
    term = losses.get(name, weight=1.0, **TERMS[name])
    d = Distiller(_student(), None if not term.needs_teacher else teacher, terms=[term], hard_weight=0.0)
    _, _, _, _, values, _ = d._compute_losses(tf.constant(x), tf.constant(y), training=False,
                                              sw=tf.constant(w))
    alone = np.array([float(d._compute_losses(tf.constant(x[i:i + 1]), tf.constant(y[i:i + 1]),
                                              training=False)[4][0]) for i in range(B)])
    assert np.all(np.isfinite(alone)) and np.ptp(alone) > 0  # the examples differ, so the weights matter
    np.testing.assert_allclose(float(values[0]), np.sum(w * alone) / B, rtol=2e-5)


def test_two_teachers_weigh_examples_and_teachers(batch, teacher):
    x, y, w = batch
    other = models.build("mlp", (28, 28, 1), 10, hidden=(8,))
    term = losses.get("hinton", temperature=2.0, weight=1.0)
    d = Distiller(_student(), [teacher, other], terms=[term], hard_weight=0.0, teacher_weights=[0.75, 0.25])
    _, _, _, _, values, _ = d._compute_losses(tf.constant(x), tf.constant(y), training=False, sw=tf.constant(w))
    s = d.student.predict(x, verbose=0)
    per_example = 0.75 * 4 * np_kl(teacher.predict(x, verbose=0), s, 2.0) + 0.25 * 4 * np_kl(
        other.predict(x, verbose=0), s, 2.0)
    np.testing.assert_allclose(float(values[0]), np.sum(w * per_example) / B, rtol=1e-5)


def test_class_weight_trains_exactly_as_the_sample_weights_it_stands_for(mnist, teacher):
    (x, y), _, _ = mnist
    x, y = x[:64], y[:64]
    class_weight = {c: 0.5 + c / 4 for c in range(10)}
    trained = []
    for kwargs in ({"class_weight": class_weight},
                   {"sample_weight": np.array([class_weight[c] for c in y], np.float32)}, {}):
        student = _student(seed=3)
        d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=4.0, weight=0.5)], hard_weight=0.5)
        d.compile(optimizer=keras.optimizers.SGD(0.5))
        d.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, **kwargs)
        trained.append(student.get_weights())
    by_class, by_sample, plain = trained
    for a, b in zip(by_class, by_sample):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(by_class, plain))


def test_a_term_without_per_example_values_refuses_weights_before_training(batch, teacher):
    x, y, w = batch
    student = _student()
    before = [v.copy() for v in student.get_weights()]
    d = Distiller(student, teacher, terms=[losses.get("rkd")], hard_weight=1.0)
    assert d.unweighable_terms() == ["rkd"]
    d.compile()
    for kwargs in ({"sample_weight": w}, {"class_weight": {0: 2.0}}):
        with pytest.raises(ValueError, match="rkd cannot weigh examples"):
            d.fit(x, y, batch_size=B, epochs=1, verbose=0, **kwargs)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(B)
    with pytest.raises(ValueError, match="rkd cannot weigh examples"):
        d.fit(ds, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights()))
    d.fit(x, y, batch_size=B, epochs=1, verbose=0)  # without weights it trains
