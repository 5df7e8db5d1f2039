"""The optimizers and the schedule reach the values a NumPy reference gives at given steps; label smoothing too."""
import math

import numpy as np
import pytest

from edge_kd.errors import UserError
from edge_kd.keras import keras, tf
from edge_kd.optim import OptimizerConfig


def _reference_lr(step, peak, steps, warm):
    if step < warm:
        return peak * step / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warm, steps - warm) / (steps - warm)))


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.5])
def test_warmup_then_cosine_matches_numpy(warmup_epochs):
    steps, per_epoch, peak = 100, 10, 0.3
    sched = OptimizerConfig(warmup_epochs=warmup_epochs).schedule(peak, steps, per_epoch)
    warm = int(round(warmup_epochs * per_epoch))
    for step in (0, 1, 7, 15, 16, 50, 99, 100):
        assert float(sched(step)) == pytest.approx(_reference_lr(step, peak, steps, warm), rel=1e-5, abs=1e-7)


def _run(cfg, grads, lr_peak=0.1, steps=6, per_epoch=3):
    """Applies the gradients ``grads(step, w)`` for ``steps`` steps; returns w after each step."""
    w = tf.Variable(np.array([1.0, -2.0, 0.5], np.float32))
    opt = cfg.build(lr_peak, steps, per_epoch)
    out = []
    for step in range(steps):
        opt.apply_gradients([(tf.constant(grads(step, w.numpy())), w)])
        out.append(w.numpy().copy())
    return np.array(out)


def _grad(step, w):
    return (0.5 * w + np.array([0.1, -0.3, 0.2]) * (step + 1)).astype(np.float32)


def test_sgd_with_nesterov_momentum_and_weight_decay_matches_numpy():
    cfg = OptimizerConfig(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.01, warmup_epochs=1)
    got = _run(cfg, _grad)
    w, m, ref = np.array([1.0, -2.0, 0.5]), np.zeros(3), []
    for step in range(6):
        lr = _reference_lr(step, 0.1, 6, 3)
        g = _grad(step, w.astype(np.float32)).astype(np.float64)
        w = w - lr * 0.01 * w  # decoupled weight decay, before the update
        m = 0.9 * m - lr * g
        w = w + 0.9 * m - lr * g
        ref.append(w.copy())
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-6)


def test_adamw_matches_numpy():
    cfg = OptimizerConfig(optimizer="adamw", weight_decay=0.05)
    got = _run(cfg, _grad)
    w, m, v, ref = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3), []
    b1, b2, eps = 0.9, 0.999, 1e-7
    for step in range(6):
        lr = _reference_lr(step, 0.1, 6, 0)
        g = _grad(step, w.astype(np.float32)).astype(np.float64)
        w = w - lr * 0.05 * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        t = step + 1
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        w = w - alpha * m / (np.sqrt(v) + eps)
        ref.append(w.copy())
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-5)  # float32 against float64


def test_plain_sgd_without_momentum_is_gradient_descent():
    got = _run(OptimizerConfig(optimizer="sgd", momentum=0.0), _grad, steps=2, per_epoch=2)
    w = np.array([1.0, -2.0, 0.5])
    for step in range(2):
        w = w - _reference_lr(step, 0.1, 2, 0) * _grad(step, w.astype(np.float32))
    np.testing.assert_allclose(got[-1], w, rtol=1e-6)


def test_adamw_without_weight_decay_is_refused():
    with pytest.raises(UserError, match="training.weight_decay must be > 0"):
        OptimizerConfig(optimizer="adamw")
    with pytest.raises(UserError, match="training.optimizer"):
        OptimizerConfig(optimizer="rmsprop")


def test_label_smoothing_matches_the_smoothed_cross_entropy():
    from edge_kd.distill import Distiller

    student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], np.float32)
    y = np.array([0, 1])
    d = Distiller(student, label_smoothing=0.2)
    got = float(d._cross_entropy(tf.constant(y), tf.constant(logits), None))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = 0.8 * np.eye(3)[y] + 0.2 / 3
    assert got == pytest.approx(float(np.mean(-(target * logp).sum(1))), rel=1e-6)
