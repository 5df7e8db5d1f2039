"""The feature-hint terms (fitnet, at), checked against independent float64 NumPy maths."""
import json

import numpy as np
import pytest

from edge_kd.distill import losses
from edge_kd.distill.hints import AttentionTransfer, FitNet
from edge_kd.errors import UserError
from edge_kd.keras import tf
from .np_reference import assert_one_line_user_error

B = 6  # batch


def _feats(layer, x):
    return {"features": {layer: tf.constant(x)}}


def _rand(seed, shape, relu=False):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.maximum(x, 0) if relu else x


# ---------------------------------------------------------------- NumPy references (float64)

def _np_bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of 1-D bilinear resizing with half-pixel centres and no antialiasing."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        f = np.floor(src)
        lo, hi = int(max(f, 0)), int(min(np.ceil(src), n_in - 1))
        frac = src - f
        m[o, lo] += 1 - frac
        m[o, hi] += frac
    return m


def _np_shrink(x, axis, n_out):
    """Adaptive average pooling of ``x`` along ``axis`` to ``n_out``: output o is the mean of input positions
    floor(o·n/n_out) to ceil((o+1)·n/n_out) − 1."""
    n = x.shape[axis]
    parts = [np.take(x, range(o * n // n_out, -(-(o + 1) * n // n_out)), axis=axis).mean(axis=axis, keepdims=True)
             for o in range(n_out)]
    return np.concatenate(parts, axis=axis)


def _np_resize(x, h, w):
    """Resizes NHWC ``x`` to h×w, each axis separately: a shrink averages (adaptive average pooling), a stretch
    interpolates bilinearly."""
    x = np.asarray(x, np.float64)
    x = _np_shrink(x, 1, h) if h < x.shape[1] else np.einsum("oh,bhwc->bowc", _np_bilinear_matrix(x.shape[1], h), x)
    return _np_shrink(x, 2, w) if w < x.shape[2] else np.einsum("pw,bowc->bopc", _np_bilinear_matrix(x.shape[2], w), x)


def _np_fitnet(s, t, kernel=None, bias=None):
    """mean((r(s) − t)²) with r = identity, or a 1×1 conv / dense (kernel, bias) then a resize to t's H×W."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if kernel is not None:
        k = np.asarray(kernel, np.float64).reshape(-1, t.shape[-1])  # (1, 1, Cs, Ct) or (Us, Ut)
        s = np.einsum("...i,io->...o", s, k) + bias
        if s.ndim == 4 and s.shape[1:3] != t.shape[1:3]:
            s = _np_resize(s, *t.shape[1:3])
    return float(np.mean((s - t) ** 2))


def _np_attention(a, p, hw=None):
    q = (np.abs(np.asarray(a, np.float64)) ** p).sum(-1, keepdims=True)
    if hw is not None and q.shape[1:3] != tuple(hw):
        q = _np_resize(q, *hw)
    q = q.reshape(len(q), -1)
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def _np_at_per_sample(pairs, p):
    """Mean over (student map, teacher map) pairs of ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖² per example."""
    d = [((_np_attention(s, p, t.shape[1:3]) - _np_attention(t, p)) ** 2).sum(1) for s, t in pairs]
    return np.mean(d, axis=0)


def test_numpy_resize_reference_stretches_as_tf_image_resize_and_shrinks_by_block_means():
    x = _rand(0, (2, 8, 12, 3))
    for h, w in [(16, 24), (11, 13), (8, 12)]:
        np.testing.assert_allclose(tf.image.resize(x, (h, w), method="bilinear").numpy(), _np_resize(x, h, w),
                                   rtol=1e-5, atol=1e-6)
    blocks = x.astype(np.float64).reshape(2, 2, 4, 3, 4, 3).mean(axis=(2, 4))  # 4× shrink: each output a 4×4 block
    np.testing.assert_allclose(_np_resize(x, 2, 3), blocks, rtol=1e-12)


def test_the_resize_matches_the_reference_in_every_direction():
    from edge_kd.distill.hints import _resize_to

    x = _rand(1, (2, 8, 7, 3))
    for h, w in [(4, 3), (16, 14), (3, 9), (8, 7)]:
        got = _resize_to(tf.constant(x), tf.zeros((1, h, w, 1))).numpy()
        np.testing.assert_allclose(got, _np_resize(x, h, w), rtol=1e-5, atol=1e-6)


def _position_gradient(term, s_name, s, t_name, t, spec=None):
    """The gradient of ``term``'s value with respect to student map ``s`` (optionally through a tf.function whose
    input signature ``spec`` hides the map's size)."""
    v = tf.Variable(s)

    def value(a, b):
        return term({"features": {s_name: a}}, {"features": {t_name: b}}, None)

    fn = tf.function(value, input_signature=spec) if spec else value
    with tf.GradientTape() as tape:
        tape.watch(v)
        out = fn(tf.convert_to_tensor(v), tf.constant(t)) if spec else fn(v, tf.constant(t))
    return tape.gradient(out, v).numpy()


@pytest.mark.parametrize("hidden", [False, True])
def test_every_student_position_moves_at_and_fitnet_when_the_map_shrinks_4x(hidden):
    # A 16×16 student map against a 4×4 teacher map: a bilinear shrink without antialiasing read only rows and
    # columns 1, 2, 5, 6, 9, 10, 13 and 14, and the other positions got no gradient at all.
    s, t = _rand(10, (B, 16, 16, 3), relu=True) + 0.1, _rand(11, (B, 4, 4, 6), relu=True)
    spec = [tf.TensorSpec((None, None, None, 3)), tf.TensorSpec((None, None, None, 6))] if hidden else None
    at = losses.get("at", pairs=[["s", "t"]])
    fitnet = _built_fitnet(s, t)
    for term in (at, fitnet):
        grad = _position_gradient(term, "s", s, "t", t, spec)
        assert np.all(np.abs(grad).sum(axis=-1) > 0), type(term).__name__
    # the reproduction: setting the positions a bilinear shrink skipped to 100 changes the loss
    skipped = np.ones(16, bool)
    skipped[[1, 2, 5, 6, 9, 10, 13, 14]] = False
    loud = s.copy()
    loud[:, skipped, :, :] = 100.0
    for term in (at, fitnet):
        before = float(term(_feats("s", s), _feats("t", t), None))
        assert float(term(_feats("s", loud), _feats("t", t), None)) != pytest.approx(before, rel=1e-3)


# ---------------------------------------------------------------- fitnet

def _built_fitnet(s, t, weight=1.0):
    term = losses.get("fitnet", student_layer="s", teacher_layer="t", weight=weight)
    term.build(_feats("s", s), _feats("t", t))
    return term


def _set_known_weights(term, seed):
    """Gives the adapter a fixed kernel and bias (so the NumPy reference sees the same ones); returns them."""
    layer = term._layers[0]
    r = np.random.default_rng(seed)
    kernel, bias = (r.normal(size=w.shape).astype(np.float32) for w in layer.get_weights())
    layer.set_weights([kernel, bias])
    return kernel, bias


def test_fitnet_equal_shapes_has_no_adapter_and_matches_numpy():
    s, t = _rand(1, (B, 5, 5, 4)), _rand(2, (B, 5, 5, 4))
    term = _built_fitnet(s, t)
    assert term.trainable_variables == []
    assert (term.student_taps(), term.teacher_taps()) == (["s"], ["t"])
    value = float(term(_feats("s", s), _feats("t", t), None))
    np.testing.assert_allclose(value, _np_fitnet(s, t), rtol=1e-5)
    assert abs(float(term(_feats("s", t), _feats("t", t), None))) == 0.0


@pytest.mark.parametrize("s_shape, t_shape", [
    ((B, 5, 5, 3), (B, 5, 5, 8)),   # channel mismatch: 1×1 conv
    ((B, 8, 8, 3), (B, 4, 4, 6)),   # spatial and channel mismatch: 1×1 conv, then downsample
    ((B, 3, 4, 4), (B, 6, 8, 4)),   # spatial mismatch only: 1×1 conv, then upsample
    ((B, 12), (B, 7)),              # vectors: dense
])
def test_fitnet_adapter_matches_numpy(s_shape, t_shape):
    s, t = _rand(3, s_shape), _rand(4, t_shape)
    term = _built_fitnet(s, t)
    layer = term._layers[0]
    assert layer.name == "fitnet_adapter_s"
    assert len(term.trainable_variables) == 2  # kernel and bias
    kernel, bias = _set_known_weights(term, 5)
    if len(s_shape) == 4:
        assert kernel.shape == (1, 1, s_shape[-1], t_shape[-1])
    else:
        assert kernel.shape == (s_shape[-1], t_shape[-1])
    value = term(_feats("s", s), _feats("t", t), None)
    assert value.dtype == tf.float32 and value.shape == ()
    np.testing.assert_allclose(float(value), _np_fitnet(s, t, kernel, bias), rtol=1e-5)


def test_fitnet_gradients_reach_student_and_adapter_but_not_teacher():
    s, t = _rand(6, (B, 8, 8, 3)), _rand(7, (B, 4, 4, 6))
    term = _built_fitnet(s, t)
    sv, tv = tf.Variable(s), tf.Variable(t)
    with tf.GradientTape() as tape:
        value = term({"features": {"s": sv}}, {"features": {"t": tv}}, None)
    g_s, g_t, *g_adapter = tape.gradient(value, [sv, tv, *term.trainable_variables])
    assert g_s.shape == s.shape
    assert np.all(np.isfinite(g_s.numpy())) and np.any(g_s.numpy() != 0)
    assert g_t is None or not np.any(g_t.numpy())
    assert len(g_adapter) == 2
    for g, v in zip(g_adapter, term.trainable_variables):
        assert g.shape == v.shape
        assert np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0)


def test_fitnet_runs_in_a_tf_function_with_unknown_batch_and_float16_features():
    s, t = _rand(8, (B, 8, 8, 3)), _rand(9, (B, 4, 4, 6))
    term = _built_fitnet(s, t)
    kernel, bias = _set_known_weights(term, 10)
    fn = tf.function(lambda a, b: term({"features": {"s": a}}, {"features": {"t": b}}, None),
                     input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float16),
                                      tf.TensorSpec((None, 4, 4, 6), tf.float16)])
    s16, t16 = s.astype(np.float16), t.astype(np.float16)
    value = fn(tf.constant(s16), tf.constant(t16))
    assert value.dtype == tf.float32
    np.testing.assert_allclose(float(value), _np_fitnet(s16, t16, kernel, bias), rtol=1e-5)


def test_fitnet_must_be_built_before_it_is_called():
    term = losses.get("fitnet", student_layer="s", teacher_layer="t")
    x = _rand(11, (B, 4))
    with pytest.raises(RuntimeError, match="build"):
        term(_feats("s", x), _feats("t", x), None)


@pytest.mark.parametrize("s_shape, t_shape", [((B, 4, 4, 3), (B, 16)), ((B, 16), (B, 4, 4, 3)), ((B, 4, 3), (B, 4, 3))])
def test_fitnet_refuses_mismatched_or_unsupported_ranks_at_build(s_shape, t_shape):
    term = losses.get("fitnet", student_layer="conv_s", teacher_layer="dense_t")
    with pytest.raises(UserError) as info:
        term.build(_feats("conv_s", _rand(0, s_shape)), _feats("dense_t", _rand(0, t_shape)))
    msg = str(info.value)
    assert "\n" not in msg
    for w in ["conv_s", "dense_t", str(s_shape), str(t_shape)]:
        assert w in msg


# ---------------------------------------------------------------- at

def _at_inputs(shapes, seed=20, relu=True):
    """Student and teacher feature dicts (and the raw pairs) for [(student shape, teacher shape), ...]."""
    student, teacher, raw = {}, {}, []
    for i, (s_shape, t_shape) in enumerate(shapes):
        s, t = _rand(seed + 2 * i, s_shape, relu), _rand(seed + 2 * i + 1, t_shape, relu)
        student[f"s{i}"], teacher[f"t{i}"] = tf.constant(s), tf.constant(t)
        raw.append((s, t))
    pairs = [[f"s{i}", f"t{i}"] for i in range(len(shapes))]
    return {"features": student}, {"features": teacher}, pairs, raw


AT_SHAPES = {
    "one_pair_equal": [((B, 6, 6, 3), (B, 6, 6, 8))],
    "one_pair_upsample": [((B, 4, 4, 5), (B, 8, 8, 8))],
    "one_pair_downsample": [((B, 8, 7, 5), (B, 4, 3, 2))],
    "two_pairs_mixed": [((B, 8, 8, 4), (B, 8, 8, 16)), ((B, 2, 3, 6), (B, 4, 5, 32))],
}


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("case", sorted(AT_SHAPES))
def test_at_matches_numpy(case, p):
    student, teacher, pairs, raw = _at_inputs(AT_SHAPES[case], relu=False)
    term = losses.get("at", pairs=pairs, p=p, weight=0.5)
    term.build(student, teacher)
    assert term.trainable_variables == []
    ref = _np_at_per_sample(raw, p)
    assert np.all(ref > 1e-4)  # non-trivial distances, so the relative tolerance means something
    per_sample = term.per_sample(student, teacher, None)
    assert per_sample.dtype == tf.float32 and per_sample.shape == (B,)
    np.testing.assert_allclose(per_sample.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(float(term(student, teacher, None)), ref.mean(), rtol=1e-5)


def test_at_is_zero_when_student_equals_teacher():
    student, _, pairs, _ = _at_inputs(AT_SHAPES["one_pair_equal"])
    twin = {"features": {"t0": student["features"]["s0"]}}
    for p in (0.5, 1.0, 2.0):
        term = losses.get("at", pairs=pairs, p=p)
        assert float(term(student, twin, None)) == 0.0


def test_at_taps_config_and_a_single_bare_pair():
    term = losses.get("at", pairs=[["a1", "b1"], ["a2", "b2"]])
    assert (term.student_taps(), term.teacher_taps()) == (["a1", "a2"], ["b1", "b2"])
    assert term.config() == {"pairs": [["a1", "b1"], ["a2", "b2"]], "p": 2.0, "weight": 1.0}
    json.dumps(term.config())
    single = losses.get("at", pairs=("a1", "b1"), p=3)
    assert single.pairs == [["a1", "b1"]] and single.p == 3.0


@pytest.mark.parametrize("p", [0.5, 2.0])
def test_at_gradients_reach_the_student_only_and_stay_finite_on_zeros(p):
    # ReLU-like maps with many exact zeros (and one all-zero example): the gradient must stay finite.
    student, teacher, pairs, raw = _at_inputs(AT_SHAPES["two_pairs_mixed"])
    s0 = raw[0][0].copy()
    s0[0] = 0.0
    sv = [tf.Variable(s0), tf.Variable(raw[1][0])]
    tv = [tf.Variable(t) for _, t in raw]
    term = losses.get("at", pairs=pairs, p=p)
    with tf.GradientTape() as tape:
        value = term({"features": {"s0": sv[0], "s1": sv[1]}}, {"features": {"t0": tv[0], "t1": tv[1]}}, None)
    grads = tape.gradient(value, sv + tv)
    for g, v in zip(grads[:2], sv):
        assert g.shape == v.shape
        assert np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0)
    for g in grads[2:]:
        assert g is None or not np.any(g.numpy())


def test_at_runs_in_a_tf_function_with_unknown_batch():
    student, teacher, pairs, raw = _at_inputs(AT_SHAPES["one_pair_upsample"])
    term = losses.get("at", pairs=pairs)
    fn = tf.function(lambda a, b: term({"features": {"s0": a}}, {"features": {"t0": b}}, None),
                     input_signature=[tf.TensorSpec((None, 4, 4, 5)), tf.TensorSpec((None, 8, 8, 8))])
    value = fn(student["features"]["s0"], teacher["features"]["t0"])
    np.testing.assert_allclose(float(value), _np_at_per_sample(raw, 2.0).mean(), rtol=1e-5)


def test_at_refuses_non_4d_features_at_build():
    term = losses.get("at", pairs=[["s0", "flat_t"]])
    with pytest.raises(UserError) as info:
        term.build(_feats("s0", _rand(0, (B, 4, 4, 3))), _feats("flat_t", _rand(0, (B, 48))))
    msg = str(info.value)
    assert "\n" not in msg and "flat_t" in msg and str((B, 48)) in msg


# ---------------------------------------------------------------- registry

def test_registry_builds_both_terms():
    assert {"fitnet", "at"} <= set(losses.available())
    assert losses.params_of("fitnet") == ["student_layer", "teacher_layer", "weight"]
    assert losses.params_of("at") == ["pairs", "p", "weight"]
    fit = losses.get("fitnet", student_layer="s", teacher_layer="t", weight=0.3)
    assert isinstance(fit, FitNet) and fit.name == "fitnet"
    assert fit.config() == {"student_layer": "s", "teacher_layer": "t", "weight": 0.3}
    at = losses.get("at", pairs=[["s", "t"]])
    assert isinstance(at, AttentionTransfer) and at.name == "at" and at.has_per_sample


@pytest.mark.parametrize("name, params, words", [
    ("fitnet", {}, ["student_layer"]),
    ("fitnet", {"student_layer": "s"}, ["teacher_layer"]),
    ("fitnet", {"student_layer": "", "teacher_layer": "t"}, ["student_layer"]),
    ("fitnet", {"student_layer": "s", "teacher_layer": 3}, ["teacher_layer", "3"]),
    ("fitnet", {"student_layer": "s", "teacher_layer": "t", "weight": -1}, ["weight", "-1"]),
    ("fitnet", {"layer": "s"}, ["layer", "student_layer"]),
    ("at", {}, ["pairs"]),
    ("at", {"pairs": []}, ["pairs"]),
    ("at", {"pairs": [["a"]]}, ["pairs", "'a'"]),
    ("at", {"pairs": [["a", "b"], ["c", 1]]}, ["pairs"]),
    ("at", {"pairs": "ab"}, ["pairs"]),
    ("at", {"pairs": [["a", "b"]], "p": 0}, ["p ", "0"]),
    ("at", {"pairs": [["a", "b"]], "p": -2}, ["p ", "-2"]),
    ("at", {"pairs": [["a", "b"]], "p": "two"}, ["p ", "two"]),
])
def test_bad_params_are_user_errors(name, params, words):
    assert_one_line_user_error(name, params, words)
