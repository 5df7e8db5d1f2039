"""The ``dkd`` and ``virtual_teacher`` terms and logit standardization, checked against float64 NumPy maths."""
import numpy as np
import pytest

from edge_kd.distill import losses
from edge_kd.distill.soft_targets import decoupled_kl
from edge_kd.errors import UserError
from edge_kd.keras import tf
from .np_reference import assert_one_line_user_error, np_kl, np_log_softmax

K = 10  # classes
B = 16  # batch
# Absolute float32 resolution of a KL built from log-probabilities of magnitude up to ~10 (float32
# spacing there is ~1e-6): the unscaled part of every comparison with float64 gets this much slack.
F32 = 5e-6


def _np_dkd_parts(t_logits, s_logits, y, T):
    """Per-sample (TCKD, NCKD) in float64, in probability space: b = [p_g, 1 − p_g], p̂ = p_¬g / (1 − p_g)."""
    p_t, p_s = np.exp(np_log_softmax(t_logits / T)), np.exp(np_log_softmax(s_logits / T))
    rows = np.arange(len(y))
    gt = np.zeros_like(p_t, bool)
    gt[rows, y] = True
    b_t = np.stack([p_t[rows, y], 1.0 - p_t[rows, y]], -1)
    b_s = np.stack([p_s[rows, y], 1.0 - p_s[rows, y]], -1)
    tckd = (b_t * np.log(b_t / b_s)).sum(-1)
    hat_t = p_t[~gt].reshape(len(y), -1) / b_t[:, 1:]
    hat_s = p_s[~gt].reshape(len(y), -1) / b_s[:, 1:]
    nckd = (hat_t * np.log(hat_t / hat_s)).sum(-1)
    return tckd, nckd


def _np_virtual(y, c, k=K):
    p = np.full((len(y), k), (1.0 - c) / (k - 1))
    p[np.arange(len(y)), y] = c
    return p


@pytest.fixture(scope="module")
def fixed():
    """Student and teacher logits of moderate size, and labels."""
    r = np.random.default_rng(7)
    s = (r.normal(size=(B, K)) * 2.0).astype(np.float32)
    t = (r.normal(size=(B, K)) * 3.0).astype(np.float32)
    y = r.integers(0, K, size=B).astype(np.int64)
    return s, t, y


def _dicts(s, t, epoch=0.0):
    return {"logits": tf.constant(s), "epoch": tf.constant(epoch, tf.float32)}, {"logits": tf.constant(t)}


# ---------------------------------------------------------------------------------------------- dkd

@pytest.mark.parametrize("warmup, epoch, factor", [
    (0.0, 0.0, 1.0),    # no warm-up: full weight from the first step
    (2.0, 0.5, 0.25),   # before the end of the warm-up: linear
    (2.0, 2.0, 1.0),    # at it
    (2.0, 3.5, 1.0),    # after it
    (0.5, 0.2, 0.4),
])
@pytest.mark.parametrize("alpha, beta, T", [
    (1.0, 8.0, 4.0),  # the paper's CIFAR-100 setting
    (1.0, 0.0, 4.0),  # TCKD alone
    (0.0, 8.0, 4.0),  # NCKD alone
    (0.5, 2.0, 1.0),
    (2.0, 1.0, 10.0),
])
def test_dkd_matches_numpy(fixed, alpha, beta, T, warmup, epoch, factor):
    s, t, y = fixed
    tckd, nckd = _np_dkd_parts(t, s, y, T)
    assert min(tckd.mean(), nckd.mean()) > 50 * F32  # both parts well above the float32 slack
    ref = (alpha * tckd + beta * nckd) * T * T * factor

    term = losses.get("dkd", alpha=alpha, beta=beta, temperature=T, warmup_epochs=warmup)
    student, teacher = _dicts(s, t, epoch)
    atol = F32 * T * T * (alpha + beta) * factor
    per = term.per_sample(student, teacher, tf.constant(y)).numpy()
    assert per.shape == (B,)
    np.testing.assert_allclose(per, ref, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(float(term(student, teacher, tf.constant(y))), ref.mean(), rtol=1e-5, atol=atol)


def test_dkd_is_zero_at_the_start_of_the_warm_up(fixed):
    s, t, y = fixed
    term = losses.get("dkd", warmup_epochs=3.0)
    assert float(term(*_dicts(s, t, 0.0), y)) == 0.0
    assert float(term.warmup_factor({"epoch": tf.constant(1.5)})) == pytest.approx(0.5)
    # Without a warm-up the epoch is not read at all.
    assert losses.get("dkd", warmup_epochs=0).warmup_factor({}) == 1.0


@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_dkd_parts_recompose_classical_kd(fixed, T):
    """The paper's decomposition: KL(p_t ‖ p_s) = TCKD + (1 − p_t,g) · NCKD, per example."""
    s, t, y = fixed
    student, teacher = _dicts(s, t)
    tckd = losses.get("dkd", alpha=1, beta=0, temperature=T, warmup_epochs=0).per_sample(student, teacher, y)
    nckd = losses.get("dkd", alpha=0, beta=1, temperature=T, warmup_epochs=0).per_sample(student, teacher, y)
    kd = losses.get("hinton", temperature=T).per_sample(student, teacher, y).numpy()
    p_t_gt = np.exp(np_log_softmax(t / T))[np.arange(B), y]
    np.testing.assert_allclose(tckd.numpy() + (1.0 - p_t_gt) * nckd.numpy(), kd, rtol=1e-5, atol=2 * F32 * T * T)
    # So alpha = beta = 1 upper-bounds classical KD (1 − p_t,g ≤ 1).
    both = losses.get("dkd", alpha=1, beta=1, temperature=T, warmup_epochs=0).per_sample(student, teacher, y)
    assert np.all(both.numpy() >= kd - F32 * T * T)


def test_decoupled_kl_matches_numpy_and_is_shift_invariant(fixed):
    s, t, y = fixed
    tckd, nckd = decoupled_kl(t, s, y, 2.0)
    ref_t, ref_n = _np_dkd_parts(t, s, y, 2.0)
    np.testing.assert_allclose(tckd.numpy(), ref_t, rtol=1e-5, atol=F32)
    np.testing.assert_allclose(nckd.numpy(), ref_n, rtol=1e-5, atol=F32)
    # A per-row shift of the logits changes no probability; moving only the target logit changes no p̂.
    shifted = s + np.arange(B, dtype=np.float32)[:, None] * 0.5
    for part, ref in zip(decoupled_kl(t, shifted, y, 2.0), (ref_t, ref_n)):
        np.testing.assert_allclose(part.numpy(), ref, rtol=1e-5, atol=F32)
    target_moved = s.copy()
    target_moved[np.arange(B), y] += 5.0
    np.testing.assert_allclose(decoupled_kl(t, target_moved, y, 2.0)[1].numpy(), ref_n, rtol=1e-5, atol=F32)


def test_dkd_with_two_classes_is_all_tckd(fixed):
    """With K = 2 the single non-target class leaves NCKD = 0, and TCKD is classical KD."""
    s, t, y = fixed
    s2, t2, y2 = s[:, :2], t[:, :2], y % 2
    student, teacher = _dicts(s2, t2)
    nckd = losses.get("dkd", alpha=0, warmup_epochs=0).per_sample(student, teacher, y2).numpy()
    np.testing.assert_array_equal(nckd, np.zeros(B, np.float32))
    tckd = losses.get("dkd", beta=0, warmup_epochs=0).per_sample(student, teacher, y2).numpy()
    np.testing.assert_allclose(tckd, 16.0 * np_kl(t2, s2, 4.0), rtol=1e-5, atol=16 * F32)


def test_dkd_is_zero_when_student_equals_teacher(fixed):
    s, _, y = fixed
    value = float(losses.get("dkd", warmup_epochs=0)(*_dicts(s, s), y))
    assert abs(value) < F32


def test_dkd_stays_finite_for_confident_logits(fixed):
    """Near one-hot softmaxes (p_g → 1 or 0 in float32) keep every part finite: all in log space."""
    s, t, y = fixed
    value = losses.get("dkd", temperature=1.0, warmup_epochs=0).per_sample(*_dicts(s * 60, t * 60), y)
    assert np.all(np.isfinite(value.numpy()))


def test_dkd_gradients_flow_to_the_student_only(fixed):
    s, t, y = fixed
    sv, tv = tf.Variable(s), tf.Variable(t)
    term = losses.get("dkd", warmup_epochs=0)
    with tf.GradientTape(persistent=True) as tape:
        value = term({"logits": sv, "epoch": tf.constant(0.0)}, {"logits": tv}, y)
        nckd_only = losses.get("dkd", alpha=0, warmup_epochs=0)({"logits": sv}, {"logits": tv}, y)
    g = tape.gradient(value, sv)
    assert g.shape == (B, K)
    assert np.all(np.isfinite(g.numpy())) and np.abs(g.numpy()).max() > 1e-4
    assert tape.gradient(value, tv) is None  # teacher logits are behind stop_gradient
    # NCKD never reads the student's target logit.
    g_n = tape.gradient(nckd_only, sv).numpy()
    assert np.all(g_n[np.arange(B), y] == 0.0) and np.abs(g_n).max() > 1e-4


def test_dkd_warm_up_scales_the_gradient(fixed):
    s, t, y = fixed
    sv = tf.Variable(s)
    term = losses.get("dkd", warmup_epochs=4.0)
    grads = []
    for epoch in (1.0, 4.0):
        with tf.GradientTape() as tape:
            value = term({"logits": sv, "epoch": tf.constant(epoch)}, {"logits": tf.constant(t)}, y)
        grads.append(tape.gradient(value, sv).numpy())
    np.testing.assert_allclose(grads[0], 0.25 * grads[1], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------- virtual_teacher

@pytest.mark.parametrize("c", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_virtual_teacher_matches_numpy(fixed, c, T):
    s, _, y = fixed
    log_p_v = np.log(_np_virtual(y, c))
    ref = T * T * np_kl(log_p_v, s, T)
    assert ref.mean() > 50 * F32 * T * T

    term = losses.get("virtual_teacher", correct_prob=c, temperature=T)
    student = {"logits": tf.constant(s), "epoch": tf.constant(0.0)}
    per = term.per_sample(student, None, tf.constant(y)).numpy()
    assert per.shape == (B,)
    np.testing.assert_allclose(per, ref, rtol=1e-5, atol=F32 * T * T)
    np.testing.assert_allclose(float(term(student, None, tf.constant(y))), ref.mean(), rtol=1e-5, atol=F32 * T * T)


@pytest.mark.parametrize("c", [0.3, 0.9, 0.99])
def test_virtual_teacher_at_t1_is_the_hand_designed_distribution(fixed, c):
    s, _, y = fixed
    term = losses.get("virtual_teacher", correct_prob=c, temperature=1.0)
    log_p = term.log_probs(tf.constant(s), y).numpy()
    np.testing.assert_allclose(np.exp(log_p), _np_virtual(y, c), rtol=1e-6)
    np.testing.assert_allclose(np.exp(np_log_softmax(log_p)), _np_virtual(y, c), rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_virtual_teacher_is_minimised_at_the_virtual_distribution(fixed, T):
    _, _, y = fixed
    term = losses.get("virtual_teacher", correct_prob=0.9, temperature=T)
    # Any per-row shift of log p_v is the same student distribution.
    best = (np.log(_np_virtual(y, 0.9)) + np.arange(B)[:, None]).astype(np.float32)
    sv = tf.Variable(best)
    with tf.GradientTape() as tape:
        value = term({"logits": sv}, None, y)
    assert abs(float(value)) < F32 * T * T
    assert np.abs(tape.gradient(value, sv).numpy()).max() < 1e-6
    r = np.random.default_rng(0)
    for _ in range(3):
        nudged = best + (0.1 * r.normal(size=best.shape)).astype(np.float32)
        assert float(term({"logits": tf.constant(nudged)}, None, y)) > float(value)


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_virtual_teacher_gradient(fixed, T):
    s, _, y = fixed
    sv = tf.Variable(s)
    term = losses.get("virtual_teacher", temperature=T)
    with tf.GradientTape() as tape:
        value = term({"logits": sv}, None, y)
    g = tape.gradient(value, sv).numpy()
    assert g.shape == (B, K) and np.all(np.isfinite(g)) and np.abs(g).max() > 1e-4
    # d/ds [T² KL(q ‖ softmax(s/T))] averaged over the batch = T (softmax(s/T) − q) / B
    q = np.exp(np_log_softmax(np.log(_np_virtual(y, 0.9)) / T))
    np.testing.assert_allclose(g, T * (np.exp(np_log_softmax(s / T)) - q) / B, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------ both, in graphs

@pytest.mark.parametrize("classes", [K, None])
@pytest.mark.parametrize("name", ["dkd", "virtual_teacher"])
def test_terms_trace_with_unknown_batch_and_classes(fixed, name, classes):
    """In graphs, an unknown class count takes the dynamic path; labels may be (B, 1) floats."""
    s, t, y = fixed
    term = losses.get(name, warmup_epochs=2.0) if name == "dkd" else losses.get(name)
    spec = tf.TensorSpec([None, classes], tf.float32)

    @tf.function(input_signature=[spec, spec, tf.TensorSpec([None, 1], tf.float32)])
    def run(s_, t_, y_):
        return term.per_sample({"logits": s_, "epoch": tf.constant(1.0)}, {"logits": t_}, y_)

    eager = term.per_sample(*_dicts(s, t, 1.0), y).numpy()
    graph = run(tf.constant(s), tf.constant(t), tf.constant(y[:, None], tf.float32)).numpy()
    scale = term.temperature ** 2 * ((term.alpha + term.beta) if name == "dkd" else 1.0)
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=F32 * scale)


@pytest.mark.parametrize("name", ["dkd", "virtual_teacher"])
def test_terms_accept_float16_logits(fixed, name):
    s, t, y = fixed
    term = losses.get(name)
    s16, t16 = s.astype(np.float16), t.astype(np.float16)
    student = {"logits": tf.constant(s16), "epoch": tf.constant(5.0)}
    value = term.per_sample(student, {"logits": tf.constant(t16)}, y)
    assert value.dtype == tf.float32
    ref = term.per_sample(*_dicts(s16.astype(np.float32), t16.astype(np.float32), 5.0), y)
    np.testing.assert_allclose(value.numpy(), ref.numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- logit standardization

def _np_standardized(z):
    """Sun et al. (2024): per example, (z − mean) / (sample std + 1e-7), in float64."""
    z = np.asarray(z, np.float64)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_standardized_hinton_and_dkd_match_numpy(fixed, T):
    s, t, y = fixed
    zs, zt = _np_standardized(s), _np_standardized(t)
    hinton = losses.get("hinton", temperature=T, standardize=True)
    got = hinton.per_sample(*_dicts(s, t), y).numpy()
    ref = T * T * np_kl(zt, zs, T)
    assert ref.mean() > 50 * F32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=T * T * F32)

    dkd = losses.get("dkd", alpha=1.0, beta=8.0, temperature=T, warmup_epochs=0.0, standardize=True)
    tckd, nckd = _np_dkd_parts(zt, zs, y, T)
    np.testing.assert_allclose(dkd.per_sample(*_dicts(s, t), y).numpy(), (tckd + 8.0 * nckd) * T * T,
                               rtol=1e-5, atol=9 * T * T * F32)


def test_standardization_ignores_the_logits_scale_and_shift(fixed):
    # the point of it: a teacher whose logits are 5× wider and shifted teaches the same distribution shape
    s, t, y = fixed
    for name, params in (("hinton", {}), ("dkd", {"warmup_epochs": 0.0})):
        on, off = losses.get(name, standardize=True, **params), losses.get(name, **params)
        moved = 5.0 * t - 3.0
        np.testing.assert_allclose(on.per_sample(*_dicts(s, moved), y).numpy(),
                                   on.per_sample(*_dicts(s, t), y).numpy(), rtol=1e-4, atol=1e-5)
        assert not np.allclose(off.per_sample(*_dicts(s, moved), y).numpy(), off.per_sample(*_dicts(s, t), y).numpy(),
                               rtol=1e-2)


def test_standardization_of_equal_logits_is_zero_with_a_finite_gradient():
    z = tf.Variable(np.full((2, K), 3.0, np.float32))
    with tf.GradientTape() as tape:
        value = losses.get("hinton", standardize=True)({"logits": z}, {"logits": tf.constant(np.eye(K)[:2] * 4.0)},
                                                      None)
    grad = tape.gradient(value, z).numpy()
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)) and np.any(grad != 0)


# ----------------------------------------------------------------------------------------- registry

def test_registry_builds_both_terms_with_their_defaults():
    assert {"dkd", "virtual_teacher"} <= set(losses.available())
    assert losses.params_of("dkd") == ["alpha", "beta", "temperature", "warmup_epochs", "standardize", "weight"]
    assert losses.params_of("virtual_teacher") == ["correct_prob", "temperature", "weight"]

    dkd = losses.get("dkd")
    assert (dkd.name, dkd.needs_teacher, dkd.has_per_sample) == ("dkd", True, True)
    assert dkd.config() == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 1.0,
                            "standardize": False, "weight": 1.0}

    vt = losses.get("virtual_teacher", weight=0.5)
    assert (vt.name, vt.has_per_sample) == ("virtual_teacher", True)
    assert vt.needs_teacher is False
    assert vt.config() == {"correct_prob": 0.9, "temperature": 20.0, "weight": 0.5}
    assert losses.get("dkd", alpha=0, beta=0, warmup_epochs=0).config()["beta"] == 0.0


@pytest.mark.parametrize("name, params, words", [
    ("dkd", {"alpha": -1.0}, ["alpha", "-1.0"]),
    ("dkd", {"beta": -0.5}, ["beta", "-0.5"]),
    ("dkd", {"temperature": 0}, ["temperature", "0"]),
    ("dkd", {"warmup_epochs": -1}, ["warmup_epochs", "-1"]),
    ("dkd", {"alpha": "big"}, ["alpha", "big"]),
    ("dkd", {"gamma": 1.0}, ["gamma", "alpha", "beta", "warmup_epochs"]),
    ("dkd", {"weight": -1}, ["weight", "-1"]),
    ("dkd", {"standardize": "yes"}, ["standardize", "true or false", "'yes'"]),
    ("hinton", {"standardize": 1}, ["standardize", "true or false", "1"]),
    ("virtual_teacher", {"correct_prob": 0}, ["correct_prob", "(0, 1)", "0"]),
    ("virtual_teacher", {"correct_prob": 1.0}, ["correct_prob", "(0, 1)", "1.0"]),
    ("virtual_teacher", {"correct_prob": 1.5}, ["correct_prob", "1.5"]),
    ("virtual_teacher", {"correct_prob": "high"}, ["correct_prob", "high"]),
    ("virtual_teacher", {"temperature": -2}, ["temperature", "-2"]),
    ("virtual_teacher", {"alpha": 0.5}, ["alpha", "correct_prob"]),
])
def test_bad_params_are_user_errors(name, params, words):
    assert_one_line_user_error(name, params, words)


@pytest.mark.parametrize("name", ["dkd", "virtual_teacher"])
def test_single_class_logits_are_a_user_error(name):
    one = {"logits": tf.zeros((4, 1)), "epoch": tf.constant(1.0)}
    with pytest.raises(UserError, match="2 classes"):
        losses.get(name).per_sample(one, {"logits": tf.zeros((4, 1))}, tf.zeros(4, tf.int32))
