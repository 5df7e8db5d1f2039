"""Soft-target terms on logits: Hinton's KD, decoupled KD and a teacher-free virtual teacher.

``hinton``
    Soft targets. G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
    NIPS 2014 Deep Learning Workshop (arXiv:1503.02531).
``dkd``
    Decoupled Knowledge Distillation. B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled
    Knowledge Distillation", CVPR 2022 (arXiv:2203.08679); reference code: megvii-research/mdistiller.
``virtual_teacher``
    Teacher-free KD with a hand-designed teacher (Tf-KD_reg). L. Yuan, F. E. H. Tay, G. Li, T. Wang,
    J. Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020
    (arXiv:1909.11723); reference code: yuanli2333/Teacher-free-Knowledge-Distillation.

Both are per-example terms (``has_per_sample``), batch-averaged by ``LossTerm.__call__``.

``standardize: true`` (``hinton``, ``dkd``) z-scores teacher and student logits per example before the tempered
softmax: logit standardization, S. Sun, W. Ren, J. Li, R. Wang, X. Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024 (arXiv:2403.01427); reference code: sunshangquan/logit-standardization-KD. The student
then matches the shape of the teacher's logits, not their scale (a small student need not reach a big teacher's
logit range), and T acts on logits of unit spread.

>>> from edge_kd.distill import losses
>>> losses.get("dkd", beta=2.0).config()
{'alpha': 1.0, 'beta': 2.0, 'temperature': 4.0, 'warmup_epochs': 1.0, 'standardize': False, 'weight': 1.0}
>>> losses.get("virtual_teacher").needs_teacher
False
"""
from __future__ import annotations

import math

from edge_kd.distill.registry import LossTerm, check_bool, check_range, register
from edge_kd.errors import UserError
from edge_kd.keras import tf


def standardized(logits):
    """Returns (batch, classes) ``logits`` z-scored per example, in float32: minus their mean over the classes,
    divided by their sample standard deviation (n − 1, as the reference code's ``torch.std``) plus 1e-7. The
    variance gets 1e-12 under its square root, so equal logits (a spread of 0) give 0 with a finite gradient."""
    z = tf.cast(logits, tf.float32)
    centred = z - tf.reduce_mean(z, axis=-1, keepdims=True)
    k = tf.cast(tf.shape(z)[-1], tf.float32)
    variance = tf.reduce_sum(tf.square(centred), axis=-1, keepdims=True) / (k - 1.0)
    return centred / (tf.sqrt(variance + 1e-12) + 1e-7)


def soft_kl(teacher_logits, student_logits, temperature):
    """Returns the per-sample KL(softmax(t/T) ‖ softmax(s/T)) as a (batch,) tensor."""
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p_t = tf.nn.log_softmax(t, axis=-1)
    log_p_s = tf.nn.log_softmax(s, axis=-1)
    return tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


@register("hinton")
class Hinton(LossTerm):
    """Hinton et al. (2015) soft targets: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch-averaged.

    The T² factor keeps the soft term's gradient magnitude comparable across temperatures, so the
    weight between hard and soft terms need not be retuned when T changes. ``standardize`` z-scores both
    logits first (``standardized``; the module's docstring), T² kept as the reference code keeps it.
    """

    def __init__(self, temperature: float = 4.0, standardize: bool = False, weight: float = 1.0):
        super().__init__(weight)
        self.temperature = check_range("temperature", temperature, 0.0, None, low_open=True)
        self.standardize = check_bool("standardize", standardize)

    has_per_sample = True

    def per_sample(self, student, teacher, y):
        t, s = _logits(teacher, student, self.standardize)
        return (self.temperature ** 2) * soft_kl(t, s, self.temperature)


def _logits(teacher, student, standardize: bool):
    """Returns the teacher's and the student's logits, z-scored when ``standardize``."""
    t, s = teacher["logits"], student["logits"]
    return (standardized(t), standardized(s)) if standardize else (t, s)


def _num_classes(logits):
    """Returns the classes of (batch, classes) logits: a static int where known, else a scalar tensor."""
    k = logits.shape[-1]
    if k is None:
        return tf.shape(logits)[-1]
    if k < 2:
        raise UserError(f"distillation on logits needs at least 2 classes, got {k}")
    return k


def _labels(y):
    return tf.reshape(tf.cast(y, tf.int32), [-1])


def _kl_from_log(log_p, log_q):
    """Returns KL(p ‖ q) over the last axis from log-probabilities."""
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def decoupled_kl(teacher_logits, student_logits, y, temperature):
    """Returns the per-sample ``(TCKD, NCKD)`` of Zhao et al. (2022), two (batch,) tensors, without T².

    With ``p = softmax(z/T)`` and ``g = y`` the label: TCKD = KL(b_t ‖ b_s) with the binary
    ``b = [p_g, 1 − p_g]``; NCKD = KL(p̂_t ‖ p̂_s) with ``p̂`` the softmax of ``z/T`` over the K − 1
    non-target classes. The non-target logits are gathered exactly (no large-constant masking), and
    everything is done in log space: ``log p_g = z_g − lse(z)``, ``log(1 − p_g) = lse(z_¬g) − lse(z)``,
    ``log p̂ = z_¬g − lse(z_¬g)``. Gradients flow into both logits; callers stop them where wanted.
    For every example ``KL(p_t ‖ p_s) = TCKD + (1 − p_t,g) · NCKD`` (the paper's reformulation of classical KD).
    """
    y = _labels(y)
    s = tf.cast(student_logits, tf.float32) / temperature
    t = tf.cast(teacher_logits, tf.float32) / temperature
    # The j-th non-target class of a row with label g is j for j < g and j + 1 otherwise.
    j = tf.range(_num_classes(s) - 1)[None, :]
    others = j + tf.cast(j >= y[:, None], tf.int32)

    def parts(z):
        lse = tf.reduce_logsumexp(z, axis=-1)
        z_other = tf.gather(z, others, batch_dims=1)
        lse_other = tf.reduce_logsumexp(z_other, axis=-1)
        log_binary = tf.stack([tf.gather(z, y, batch_dims=1) - lse, lse_other - lse], axis=-1)
        return log_binary, z_other - lse_other[:, None]

    log_b_s, log_hat_s = parts(s)
    log_b_t, log_hat_t = parts(t)
    return _kl_from_log(log_b_t, log_b_s), _kl_from_log(log_hat_t, log_hat_s)


@register("dkd")
class DKD(LossTerm):
    """Decoupled KD (Zhao et al., CVPR 2022): ``(α·TCKD + β·NCKD) · T² · min(epoch / warmup_epochs, 1)``.

    TCKD (target-class KD) matches the binary "label vs. rest" probabilities of teacher and student;
    NCKD (non-target-class KD) matches their distributions over the non-target classes alone (see
    ``decoupled_kl``). Classical KD weights NCKD by ``1 − p_t,g``, which shrinks it exactly where the
    teacher is confident; DKD weights it by a free ``beta`` instead (8 in the paper's CIFAR-100 setup).

    The warm-up factor reads ``student["epoch"]`` (epochs completed in this fit, fractional) and rises
    linearly from 0 to 1 over ``warmup_epochs``; ``warmup_epochs=0`` turns it off. The reference code
    multiplies by ``min(epoch / warmup, 1)`` with a 1-based integer epoch (its first epoch already gets
    ``1/warmup``); ours is continuous from 0, on purpose: the reference's 20-epoch warm-up of a 240-epoch
    schedule is a ramp in 20 steps, while at edge-kd's schedules of 1 to 10 epochs integer epochs would make
    ``warmup_epochs: 1`` no warm-up at all and a longer one a few large jumps. ``standardize`` z-scores both
    logits first, as for ``hinton``. Teacher logits are behind ``stop_gradient``.
    """

    has_per_sample = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: float = 1.0, standardize: bool = False, weight: float = 1.0):
        super().__init__(weight)
        self.standardize = check_bool("standardize", standardize)
        self.alpha = check_range("alpha", alpha, 0.0, None)
        self.beta = check_range("beta", beta, 0.0, None)
        self.temperature = check_range("temperature", temperature, 0.0, None, low_open=True)
        self.warmup_epochs = check_range("warmup_epochs", warmup_epochs, 0.0, None)

    def warmup_factor(self, student: dict):
        """Returns ``min(epoch / warmup_epochs, 1)`` (clipped at 0 too), or 1.0 without a warm-up."""
        if self.warmup_epochs == 0:
            return 1.0
        epoch = tf.cast(student["epoch"], tf.float32)
        return tf.clip_by_value(epoch / self.warmup_epochs, 0.0, 1.0)

    def per_sample(self, student, teacher, y):
        t, s = _logits(teacher, student, self.standardize)
        tckd, nckd = decoupled_kl(tf.stop_gradient(t), s, y, self.temperature)
        return (self.alpha * tckd + self.beta * nckd) * self.temperature ** 2 * self.warmup_factor(student)


@register("virtual_teacher")
class VirtualTeacher(LossTerm):
    """Teacher-free KD with a virtual teacher (Tf-KD_reg, Yuan et al., CVPR 2020); needs no teacher.

    Over the K classes of the student's logits the virtual teacher puts ``correct_prob`` on the label
    and ``(1 − correct_prob)/(K − 1)`` on every other class (``p_v``). Its logits are ``log p_v``, softened
    at T like any teacher: the term is ``T² · KL(softmax(log p_v / T) ‖ softmax(s / T))`` per example.
    ``correct_prob`` should exceed 1/K (at or below it the "teacher" favours no class or a wrong one);
    the authors use 0.9 to 0.99.

    How this relates to the paper. The paper's regulariser is ``KL(p_v^τ ‖ p^τ)`` with a softened
    ``p_v``; the authors' code computes ``KLDiv(log_softmax(s), softmax(p_v / T))``: it softmaxes the
    probabilities ``p_v / T`` directly (at T = 20 a nearly uniform target), leaves the student
    unsoftened, averages over batch × classes and scales by a free multiplier, without T². Our choice
    is to soften the virtual teacher's log-probabilities instead, so that T = 1 reproduces ``p_v``
    exactly and larger T flattens it like a real teacher's logits, and to treat student and T² as in
    Hinton's KD; ``weight`` plays the multiplier's part. At T = 1 the term is KL(p_v ‖ softmax(s)),
    which is label-smoothing cross-entropy minus a constant.
    """

    needs_teacher = False
    has_per_sample = True

    def __init__(self, correct_prob: float = 0.9, temperature: float = 20.0, weight: float = 1.0):
        super().__init__(weight)
        self.correct_prob = check_range("correct_prob", correct_prob, None, None)
        if not 0.0 < self.correct_prob < 1.0:
            raise UserError(f"correct_prob must be in (0, 1), got {correct_prob!r}")
        self.temperature = check_range("temperature", temperature, 0.0, None, low_open=True)

    def log_probs(self, logits, y) -> tf.Tensor:
        """Returns ``log p_v``, the virtual teacher's log-probabilities, shaped like ``logits``."""
        k = _num_classes(logits)
        y = _labels(y)
        log_other = math.log1p(-self.correct_prob) - tf.math.log(tf.cast(k - 1, tf.float32))
        is_label = tf.equal(tf.range(k)[None, :], y[:, None])
        return tf.where(is_label, math.log(self.correct_prob), log_other)

    def per_sample(self, student, teacher, y):
        logits = student["logits"]
        return (self.temperature ** 2) * soft_kl(self.log_probs(logits, y), logits, self.temperature)


def hinton(student, teacher, alpha: float = 0.9, temperature: float = 4.0):
    """Returns a Distiller with loss ``(1 - alpha) · CE + alpha · T² · KL(softmax(t/T) ‖ softmax(s/T))``."""
    from edge_kd.distill.distiller import Distiller, alpha_weights

    hard, soft = alpha_weights(alpha)
    return Distiller(student, teacher, terms=[Hinton(temperature=temperature, weight=soft)], hard_weight=hard)
