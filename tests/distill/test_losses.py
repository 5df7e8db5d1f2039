"""The loss-term registry and the Hinton term, checked against NumPy maths."""
import numpy as np
import pytest

from edge_kd.distill import Distiller, hinton, losses
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf
from .np_reference import assert_one_line_user_error, np_ce, np_kl, np_log_softmax

K = 10  # classes
B = 16  # batch


@pytest.fixture(scope="module")
def fixed():
    """Student and teacher logits of moderate size (so every T is away from both limits), and labels."""
    r = np.random.default_rng(42)
    s = (r.normal(size=(B, K)) * 2.0).astype(np.float32)
    t = (r.normal(size=(B, K)) * 3.0).astype(np.float32)
    y = r.integers(0, K, size=B).astype(np.int64)
    return s, t, y


def _selector(offset):
    """A linear model returning columns offset..offset+K of its (B, 2K) input, exactly (kernel of 0s and 1s)."""
    inp = keras.Input((2 * K,))
    dense = keras.layers.Dense(K, use_bias=False)
    model = keras.Model(inp, dense(inp))
    kernel = np.zeros((2 * K, K), np.float32)
    kernel[offset:offset + K] = np.eye(K, dtype=np.float32)
    dense.set_weights([kernel])
    return model


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_hinton_term_and_distiller_total_match_numpy(fixed, T, alpha):
    s, t, y = fixed
    kl = np_kl(t, s, T)
    assert np.all(kl > 1e-3)  # a non-trivial KL, so the relative tolerance below means something
    soft_ref = T * T * kl.mean()
    ce_ref = np_ce(y, s)
    total_ref = (1.0 - alpha) * ce_ref + alpha * soft_ref

    term = losses.get("hinton", temperature=T, weight=alpha)
    assert (term.name, term.weight, term.temperature) == ("hinton", alpha, T)
    assert term.config() == {"temperature": T, "standardize": False, "weight": alpha}
    value = float(term({"logits": tf.constant(s)}, {"logits": tf.constant(t)}, tf.constant(y)))
    np.testing.assert_allclose(value, soft_ref, rtol=1e-5)

    # The Distiller's own objective, with a student and teacher that return the fixed logits exactly.
    d = hinton(_selector(0), _selector(K), alpha=alpha, temperature=T)
    assert d.hard_weight == pytest.approx(1.0 - alpha)
    x = tf.constant(np.concatenate([s, t], axis=1))
    s_out, _, total, hard, values, _ = d._compute_losses(x, tf.constant(y), training=False)
    np.testing.assert_array_equal(s_out["logits"].numpy(), s)
    np.testing.assert_allclose(float(hard), ce_ref, rtol=1e-5)
    assert len(values) == 1
    np.testing.assert_allclose(float(values[0]), soft_ref, rtol=1e-5)
    np.testing.assert_allclose(float(total), total_ref, rtol=1e-5)


def test_hinton_is_zero_when_student_equals_teacher(fixed):
    s, _, y = fixed
    term = losses.get("hinton", temperature=3.0)
    value = float(term({"logits": tf.constant(s)}, {"logits": tf.constant(s)}, tf.constant(y)))
    assert abs(value) < 1e-6


def test_hinton_handles_float16_logits(fixed):
    s, t, y = fixed
    term = losses.get("hinton", temperature=2.0)
    value = float(term({"logits": tf.constant(s, tf.float16)}, {"logits": tf.constant(t, tf.float16)}, y))
    ref = 4.0 * np_kl(t.astype(np.float16), s.astype(np.float16), 2.0).mean()
    np.testing.assert_allclose(value, ref, rtol=1e-5)


def _soft_grad(s, t, T, scaled=True):
    """Gradient of the batch-averaged soft term w.r.t. the student logits (with or without the T² factor)."""
    term = losses.get("hinton", temperature=T)
    sv = tf.Variable(s)
    with tf.GradientTape() as tape:
        v = term({"logits": sv}, {"logits": tf.constant(t)}, None)
        if not scaled:
            v = v / (T * T)
    return tape.gradient(v, sv).numpy()


def test_t_squared_keeps_the_soft_gradient_magnitude_across_temperatures(fixed):
    s, t, _ = fixed
    temps = [2.0, 4.0, 8.0, 20.0]
    grads = {T: _soft_grad(s, t, T) for T in temps}
    for T, g in grads.items():
        # d/ds [T² KL(p_t ‖ p_s)] averaged over the batch = T (softmax(s/T) − softmax(t/T)) / B
        ref = T * (np.exp(np_log_softmax(s / T)) - np.exp(np_log_softmax(t / T))) / B
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)
    norms = np.array([np.linalg.norm(grads[T]) for T in temps])
    assert norms.max() / norms.min() < 2.5, norms

    raw = np.array([np.linalg.norm(_soft_grad(s, t, T, scaled=False)) for T in temps])
    np.testing.assert_allclose(raw, norms / np.square(temps), rtol=1e-5)
    # Without T² the gradient shrinks like 1/T²: 100× from T=2 to T=20 (here within a factor 2.5 of that).
    shrink = raw[0] / raw[-1]
    assert 100 / 2.5 < shrink < 100 * 2.5, shrink
    assert np.all(np.diff(raw) < 0)


def test_available_lists_hinton_and_params_of():
    assert "hinton" in losses.available()
    assert losses.available() == sorted(losses.available())
    assert losses.params_of("hinton") == ["temperature", "standardize", "weight"]
    term = losses.get("hinton")
    assert (term.temperature, term.weight) == (4.0, 1.0)


@pytest.mark.parametrize("name, params, words", [
    ("no_such_loss", {}, ["no_such_loss", "hinton"]),
    ("hinton", {"tau": 2.0}, ["tau", "temperature", "weight"]),
    ("hinton", {"temperature": 0}, ["temperature", "0"]),
    ("hinton", {"temperature": -1.5}, ["temperature", "-1.5"]),
    ("hinton", {"temperature": "hot"}, ["temperature", "hot"]),
    ("hinton", {"weight": -0.1}, ["weight", "-0.1"]),
])
def test_get_refuses_bad_names_and_params(name, params, words):
    assert_one_line_user_error(name, params, words)


def test_weight_zero_is_allowed_and_hinton_alpha_is_range_checked():
    assert losses.get("hinton", weight=0).weight == 0.0
    student, teacher = _selector(0), _selector(K)
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="alpha"):
            hinton(student, teacher, alpha=bad)


def test_distiller_refuses_terms_without_teacher_and_duplicate_terms():
    student, teacher = _selector(0), _selector(K)
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, None, terms=[losses.get("hinton")])
    with pytest.raises(ValueError, match="once"):
        Distiller(student, teacher, terms=[losses.get("hinton"), losses.get("hinton", temperature=2)])
