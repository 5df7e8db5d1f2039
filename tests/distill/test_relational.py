"""The relational (rkd) and contrastive (crd) terms, checked against independent float64 NumPy maths."""
import numpy as np
import pytest

from edge_kd.distill import losses
from edge_kd.distill.relational import CRD, RKD
from edge_kd.keras import tf
from .np_reference import assert_one_line_user_error

B = 8  # batch
KS, KT = 6, 10  # student and teacher logit sizes (different on purpose)


# ---------------------------------------------------------------- NumPy references (float64)

def _huber(x):
    a = np.abs(x)
    return np.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _flat(x):
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1)


def _np_distances(x):
    """Pairwise distances divided by the mean of the off-diagonal ones."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    off = ~np.eye(len(x), dtype=bool)
    return d / d[off].mean()


def _np_rkd_distance(s, t):
    s, t = _flat(s), _flat(t)
    off = ~np.eye(len(s), dtype=bool)
    return _huber(_np_distances(s)[off] - _np_distances(t)[off]).mean()


def _np_angles(x):
    """cos[i, j, k] = <unit(x_i − x_j), unit(x_k − x_j)>, with unit(0) = 0, by explicit loops."""
    n = len(x)
    cos = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                a, b = x[i] - x[j], x[k] - x[j]
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                if na > 0 and nb > 0:
                    cos[i, j, k] = a @ b / (na * nb)
    return cos


def _np_rkd_angle(s, t):
    return _huber(_np_angles(_flat(s)) - _np_angles(_flat(t))).mean()


def _np_lse(z, axis):
    m = z.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_crd(s, t, heads, tau, t_bank=None, s_bank=None):
    """Per-example (CE_student_anchor + CE_teacher_anchor) / 2."""
    (ws, bs), (wt, bt) = [(np.float64(w), np.float64(b)) for w, b in heads]
    zs, zt = _unit(_flat(s) @ ws + bs), _unit(_flat(t) @ wt + bt)
    if t_bank is None:
        sim = zs @ zt.T / tau
        ce_s = _np_lse(sim, 1) - np.diag(sim)
        ce_t = _np_lse(sim, 0) - np.diag(sim)
    else:
        pos = (zs * zt).sum(-1) / tau
        ce_s = _np_lse(np.concatenate([pos[:, None], zs @ np.float64(t_bank).T / tau], 1), 1) - pos
        ce_t = _np_lse(np.concatenate([pos[:, None], zt @ np.float64(s_bank).T / tau], 1), 1) - pos
    return 0.5 * (ce_s + ce_t)


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def fixed():
    """Logits and tapped features of different sizes for student and teacher, and labels."""
    r = np.random.default_rng(7)
    f32 = np.float32
    return {
        "s": (r.normal(size=(B, KS)) * 2.0).astype(f32),
        "t": (r.normal(size=(B, KT)) * 3.0).astype(f32),
        "fs": r.normal(size=(B, 4, 3)).astype(f32),  # student layer output, flattened to 12
        "ft": r.normal(size=(B, 2, 2, 5)).astype(f32),  # teacher layer output, flattened to 20
        "y": r.integers(0, KS, size=B),
    }


def _dicts(fixed, features=False):
    student = {"logits": tf.constant(fixed["s"])}
    teacher = {"logits": tf.constant(fixed["t"])}
    if features:
        student["features"] = {"s_feat": tf.constant(fixed["fs"])}
        teacher["features"] = {"t_feat": tf.constant(fixed["ft"])}
    return student, teacher


def _embeddings(fixed, features):
    return (fixed["fs"], fixed["ft"]) if features else (fixed["s"], fixed["t"])


def _layers(features):
    return {"student_layer": "s_feat", "teacher_layer": "t_feat"} if features else {}


def _built_crd(fixed, features=False, dim=5, seed=0, **params):
    """A built crd term whose heads hold known weights; returns (term, [(W_s, b_s), (W_t, b_t)])."""
    term = losses.get("crd", dim=dim, **_layers(features), **params)
    student, teacher = _dicts(fixed, features)
    term.build(student, teacher)
    r = np.random.default_rng(seed)
    heads = []
    for head, x in zip([term.student_head, term.teacher_head], _embeddings(fixed, features)):
        w = (r.normal(size=(_flat(x).shape[1], dim)) * 0.5).astype(np.float32)
        b = (r.normal(size=dim) * 0.1).astype(np.float32)
        head.set_weights([w, b])
        heads.append((w, b))
    return term, heads


# ---------------------------------------------------------------- rkd values

@pytest.mark.parametrize("features", [False, True], ids=["logits", "features"])
@pytest.mark.parametrize("wd, wa", [(1.0, 0.0), (0.0, 1.0), (25.0, 50.0), (2.0, 3.0)])
def test_rkd_matches_numpy(fixed, features, wd, wa):
    s, t = _embeddings(fixed, features)
    dist, angle = _np_rkd_distance(s, t), _np_rkd_angle(s, t)
    assert dist > 1e-2 and angle > 1e-2  # non-trivial parts, so rtol means something
    term = losses.get("rkd", distance_weight=wd, angle_weight=wa, weight=0.5, **_layers(features))
    assert term.student_taps() == (["s_feat"] if features else [])
    assert term.teacher_taps() == (["t_feat"] if features else [])
    value = float(term(*_dicts(fixed, features), tf.constant(fixed["y"])))
    np.testing.assert_allclose(value, wd * dist + wa * angle, rtol=1e-4)


def test_rkd_parts_match_numpy(fixed):
    s, t = tf.constant(fixed["s"]), tf.constant(fixed["t"])
    term = losses.get("rkd")
    np.testing.assert_allclose(float(term.distance_loss(s, t)), _np_rkd_distance(fixed["s"], fixed["t"]), rtol=1e-4)
    np.testing.assert_allclose(float(term.angle_loss(s, t)), _np_rkd_angle(fixed["s"], fixed["t"]), rtol=1e-4)


def test_rkd_is_zero_for_equal_embeddings_and_scale_invariant(fixed):
    term = losses.get("rkd")
    s = tf.constant(fixed["s"])
    assert abs(float(term({"logits": s}, {"logits": s}, None))) < 1e-6
    base = float(term({"logits": s}, {"logits": tf.constant(fixed["t"])}, None))
    for c in (0.01, 7.3, 1000.0):
        scaled = float(term({"logits": s}, {"logits": tf.constant(fixed["t"] * c)}, None))
        np.testing.assert_allclose(scaled, base, rtol=1e-4)
    # Scaling the student changes nothing either, and neither does a shift (distances and angles are translation-free).
    np.testing.assert_allclose(float(term({"logits": s * 5.0 + 3.0}, {"logits": tf.constant(fixed["t"])}, None)),
                               base, rtol=1e-4)


def test_rkd_batch_of_one_is_zero(fixed):
    term = losses.get("rkd")
    value = term({"logits": tf.constant(fixed["s"][:1])}, {"logits": tf.constant(fixed["t"][:1])}, None)
    assert float(value) == 0.0


# ---------------------------------------------------------------- rkd gradients

def _grads(term, s, t):
    sv, tv = tf.Variable(s), tf.Variable(t)
    with tf.GradientTape() as tape:
        value = term({"logits": sv}, {"logits": tv}, None)
    return tape.gradient(value, [sv, tv])


def _no_teacher_grad(g):
    return g is None or not np.any(g.numpy())


@pytest.mark.parametrize("wd, wa", [(1.0, 0.0), (0.0, 1.0), (25.0, 50.0)])
def test_rkd_gradients_are_finite_and_reach_only_the_student(fixed, wd, wa):
    gs, gt = _grads(losses.get("rkd", distance_weight=wd, angle_weight=wa), fixed["s"], fixed["t"])
    assert gs.shape == fixed["s"].shape
    assert np.all(np.isfinite(gs.numpy())) and np.any(gs.numpy() != 0)
    assert _no_teacher_grad(gt)


def test_rkd_identical_rows_give_finite_moderate_gradients(fixed):
    s, t = fixed["s"].copy(), fixed["t"].copy()
    s[1] = s[0]  # a repeated student row: zero distance, zero difference vector
    t[3] = t[2]
    s_zero = fixed["s"].copy()
    s_zero[:3] = 0.0  # e.g. dead ReLU features for several examples
    for params in ({}, {"angle_weight": 0.0}, {"distance_weight": 0.0}):
        term = losses.get("rkd", **params)
        usual = np.abs(_grads(term, fixed["s"], fixed["t"])[0].numpy()).max()
        for student in (s, s_zero):
            value = term({"logits": tf.constant(student)}, {"logits": tf.constant(t)}, None)
            assert np.isfinite(float(value))
            gs = _grads(term, student, t)[0].numpy()
            assert np.all(np.isfinite(gs)), gs
            # No 1/‖0‖ blow-up: the same order of magnitude as for a batch of distinct rows.
            assert np.abs(gs).max() < 10 * usual, (params, np.abs(gs).max(), usual)
    # All rows identical in both models: the term is 0 and its gradient finite.
    same = np.repeat(fixed["s"][:1], B, axis=0)
    term = losses.get("rkd")
    gs, _ = _grads(term, same, same)
    assert np.all(np.isfinite(gs.numpy()))
    assert float(term({"logits": tf.constant(same)}, {"logits": tf.constant(same)}, None)) == 0.0


# ---------------------------------------------------------------- crd values

@pytest.mark.parametrize("features", [False, True], ids=["logits", "features"])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_crd_in_batch_matches_numpy(fixed, features, tau):
    term, heads = _built_crd(fixed, features, temperature=tau, bank_size=0)
    assert term.student_bank is None and term.teacher_bank is None
    s, t = _embeddings(fixed, features)
    ref = _np_crd(s, t, heads, tau)
    student, teacher = _dicts(fixed, features)
    np.testing.assert_allclose(term.per_sample(student, teacher, None).numpy(), ref, rtol=1e-4)
    np.testing.assert_allclose(float(term(student, teacher, None)), ref.mean(), rtol=1e-4)


@pytest.mark.parametrize("features", [False, True], ids=["logits", "features"])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_crd_with_bank_matches_numpy(fixed, features, tau):
    k, dim = 11, 5
    term, heads = _built_crd(fixed, features, dim=dim, temperature=tau, bank_size=k)
    assert term.teacher_bank.shape == (k, dim) and term.student_bank.shape == (k, dim)
    r = np.random.default_rng(3)
    t_bank, s_bank = [_unit(r.normal(size=(k, dim))).astype(np.float32) for _ in range(2)]
    term.teacher_bank.assign(t_bank)
    term.student_bank.assign(s_bank)
    s, t = _embeddings(fixed, features)
    ref = _np_crd(s, t, heads, tau, t_bank=t_bank, s_bank=s_bank)
    student, teacher = _dicts(fixed, features)
    np.testing.assert_allclose(term.per_sample(student, teacher, None).numpy(), ref, rtol=1e-4)
    np.testing.assert_allclose(float(term(student, teacher, None)), ref.mean(), rtol=1e-4)


def test_crd_build_makes_two_trainable_heads_and_deterministic_unit_banks(fixed):
    a, _ = _built_crd(fixed, dim=4, bank_size=6)
    b, _ = _built_crd(fixed, dim=4, bank_size=6)
    assert [h.name for h in (a.student_head, a.teacher_head)] == ["crd_student_head", "crd_teacher_head"]
    assert sorted(tuple(v.shape) for v in a.trainable_variables) == [(4,), (4,), (KS, 4), (KT, 4)]
    assert not any(v is a.teacher_bank or v is a.student_bank for v in a.trainable_variables)
    assert not a.teacher_bank.trainable and not a.student_bank.trainable and int(a.pointer) == 0
    for bank_a, bank_b in [(a.teacher_bank, b.teacher_bank), (a.student_bank, b.student_bank)]:
        np.testing.assert_array_equal(bank_a.numpy(), bank_b.numpy())
        np.testing.assert_allclose(np.linalg.norm(bank_a.numpy(), axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(a.teacher_bank.numpy(), a.student_bank.numpy())


def test_crd_needs_build(fixed):
    with pytest.raises(RuntimeError, match="build"):
        losses.get("crd")(*_dicts(fixed), None)


# ---------------------------------------------------------------- crd gradients

@pytest.mark.parametrize("bank_size", [0, 16])
def test_crd_gradients_reach_student_and_both_heads_not_the_teacher(fixed, bank_size):
    term, _ = _built_crd(fixed, bank_size=bank_size)
    sv, tv = tf.Variable(fixed["s"]), tf.Variable(fixed["t"])
    with tf.GradientTape() as tape:
        value = term({"logits": sv}, {"logits": tv}, None)
    heads = term.trainable_variables
    grads = tape.gradient(value, [sv, tv, *heads])
    assert _no_teacher_grad(grads[1])
    for g, v in zip([grads[0], *grads[2:]], [sv, *heads]):
        assert g is not None and g.shape == v.shape
        assert np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0)


# ---------------------------------------------------------------- crd memory bank

def _np_z(fixed_x, head):
    w, b = head
    return _unit(_flat(fixed_x) @ np.float64(w) + b)


def test_crd_after_train_step_enqueues_fifo_and_wraps(fixed):
    k = 5
    term, heads = _built_crd(fixed, bank_size=k)
    init_s, init_t = term.student_bank.numpy().copy(), term.teacher_bank.numpy().copy()
    s, t = fixed["s"], fixed["t"]

    term.after_train_step({"logits": tf.constant(s[:3])}, {"logits": tf.constant(t[:3])}, None)
    assert int(term.pointer) == 3
    np.testing.assert_allclose(term.student_bank.numpy()[:3], _np_z(s[:3], heads[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(term.teacher_bank.numpy()[:3], _np_z(t[:3], heads[1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(term.student_bank.numpy()[3:], init_s[3:])
    np.testing.assert_array_equal(term.teacher_bank.numpy()[3:], init_t[3:])

    # The next 3 rows go to 3, 4 and (wrapping) 0; rows 1, 2 still hold the first batch.
    term.after_train_step({"logits": tf.constant(s[3:6])}, {"logits": tf.constant(t[3:6])}, None)
    assert int(term.pointer) == 1
    expect_s = _np_z(s[[5, 1, 2, 3, 4]], heads[0])
    expect_t = _np_z(t[[5, 1, 2, 3, 4]], heads[1])
    np.testing.assert_allclose(term.student_bank.numpy(), expect_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(term.teacher_bank.numpy(), expect_t, rtol=1e-5, atol=1e-6)


def test_crd_after_train_step_inside_tf_function_and_batch_larger_than_bank(fixed):
    k = 3
    term, heads = _built_crd(fixed, bank_size=k)
    spec = tf.TensorSpec((None, None), tf.float32)  # one trace for every batch size

    @tf.function(input_signature=[spec, spec])
    def step(s, t):
        term.after_train_step({"logits": s}, {"logits": t}, None)

    s, t = fixed["s"], fixed["t"]
    step(s[:2], t[:2])  # rows 0, 1
    assert int(term.pointer) == 2
    step(s[2:7], t[2:7])  # 5 rows into a bank of 3 starting at 2: only s[4:7] stay, at 1, 2, 0
    assert int(term.pointer) == (2 + 5) % k
    np.testing.assert_allclose(term.student_bank.numpy(), _np_z(s[[6, 4, 5]], heads[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(term.teacher_bank.numpy(), _np_z(t[[6, 4, 5]], heads[1]), rtol=1e-5, atol=1e-6)


def test_crd_in_batch_after_train_step_is_a_no_op(fixed):
    term, _ = _built_crd(fixed, bank_size=0)
    term.after_train_step(*_dicts(fixed), None)
    assert term.pointer is None


# ---------------------------------------------------------------- registry and parameters

def test_registry_builds_rkd_and_crd():
    assert {"rkd", "crd"} <= set(losses.available())
    assert losses.params_of("rkd") == ["distance_weight", "angle_weight", "student_layer", "teacher_layer", "weight"]
    assert losses.params_of("crd") == ["dim", "temperature", "bank_size", "student_layer", "teacher_layer", "weight"]
    rkd, crd = losses.get("rkd"), losses.get("crd", bank_size=0, teacher_layer="t_feat")
    assert isinstance(rkd, RKD) and isinstance(crd, CRD)
    assert rkd.name == "rkd" and crd.name == "crd" and crd.has_per_sample and not rkd.has_per_sample
    assert rkd.config() == {"distance_weight": 25.0, "angle_weight": 50.0, "student_layer": None,
                            "teacher_layer": None, "weight": 1.0}
    assert crd.config() == {"dim": 128, "temperature": 0.07, "bank_size": 0, "student_layer": None,
                            "teacher_layer": "t_feat", "weight": 1.0}
    assert (crd.student_taps(), crd.teacher_taps()) == ([], ["t_feat"])
    assert losses.get("crd", dim=16.0).dim == 16


@pytest.mark.parametrize("name, params, words", [
    ("rkd", {"distance_weight": -1}, ["distance_weight", "-1"]),
    ("rkd", {"angle_weight": "wide"}, ["angle_weight", "wide"]),
    ("rkd", {"distance_weight": 0, "angle_weight": 0.0}, ["distance_weight", "angle_weight"]),
    ("rkd", {"student_layer": 3}, ["student_layer", "3"]),
    ("rkd", {"teacher_layer": ""}, ["teacher_layer"]),
    ("rkd", {"weight": -0.5}, ["weight", "-0.5"]),
    ("rkd", {"lambda_d": 1.0}, ["lambda_d", "distance_weight"]),
    ("crd", {"dim": 0}, ["dim", "0"]),
    ("crd", {"dim": 1.5}, ["dim", "1.5"]),
    ("crd", {"dim": "64"}, ["dim", "64"]),
    ("crd", {"dim": True}, ["dim", "True"]),
    ("crd", {"temperature": 0}, ["temperature", "0"]),
    ("crd", {"temperature": -0.1}, ["temperature", "-0.1"]),
    ("crd", {"bank_size": -1}, ["bank_size", "-1"]),
    ("crd", {"bank_size": 2.5}, ["bank_size", "2.5"]),
    ("crd", {"student_layer": ["a"]}, ["student_layer"]),
])
def test_bad_params_are_one_line_user_errors(name, params, words):
    assert_one_line_user_error(name, params, words)


@pytest.mark.parametrize("name", ["rkd", "crd_in_batch", "crd_bank"])
def test_terms_trace_in_tf_function_with_unknown_batch(fixed, name):
    term = losses.get("rkd") if name == "rkd" else _built_crd(fixed, bank_size=0 if name == "crd_in_batch" else 7)[0]
    spec = tf.TensorSpec((None, None), tf.float32)

    @tf.function(input_signature=[spec, spec])
    def value(s, t):
        return term({"logits": s}, {"logits": t}, None)

    for n in (B, 5):
        s, t = fixed["s"][:n], fixed["t"][:n]
        eager = float(term({"logits": tf.constant(s)}, {"logits": tf.constant(t)}, None))
        np.testing.assert_allclose(float(value(s, t)), eager, rtol=1e-5)
