"""Teachers as users bring them: softmax heads, other input sizes/ranges, saved files (safely)."""
import numpy as np
import pytest

from edge_kd.distill import adapt_teacher, load_teacher, logits_model, losses
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf
from .np_reference import np_log_softmax

K = 10
MNIST_SCALE = 1.0 / 255.0


def _np_hinton(t_logits, s_logits, T):
    lt, ls = np_log_softmax(t_logits / T), np_log_softmax(s_logits / T)
    return T * T * float((np.exp(lt) * (lt - ls)).sum(-1).mean())


def _hinton(t_logits, s_logits, T):
    term = losses.get("hinton", temperature=T)
    return float(term({"logits": tf.constant(s_logits)}, {"logits": tf.constant(t_logits)}, None))


def _body(inp, seed):
    """A small conv body; weights drawn from ``seed`` so twins can share them."""
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed), name="conv")(inp)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.layers.Dense(16, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
                              name="fc")(x)


def _head_variants(shape=(28, 28, 1)):
    """A logits teacher, a twin with a softmax Dense, and twins with a Softmax / Activation('softmax') layer."""
    inp = keras.Input(shape)
    # Large-ish logits, so a saturated softmax would show if the head were not cut exactly.
    logits = keras.layers.Dense(K, kernel_initializer=keras.initializers.RandomNormal(stddev=4.0, seed=3),
                                name="logits")(_body(inp, 1))
    logits_teacher = keras.Model(inp, logits, name="logits_teacher")

    inp2 = keras.Input(shape)
    dense_softmax = keras.Model(inp2, keras.layers.Dense(K, activation="softmax", name="probs")(_body(inp2, 1)),
                                name="dense_softmax")
    dense_softmax.set_weights(logits_teacher.get_weights())

    softmax_layer = keras.Model(inp, keras.layers.Softmax()(logits), name="softmax_layer")
    activation_layer = keras.Model(inp, keras.layers.Activation("softmax")(logits), name="activation_layer")
    return logits_teacher, {"dense": dense_softmax, "softmax": softmax_layer, "activation": activation_layer}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((32, 28, 28, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def student_logits():
    return (np.random.default_rng(1).normal(size=(32, K)) * 2).astype(np.float32)


def test_logits_head_is_kept(images):
    teacher, _ = _head_variants()
    model, head = logits_model(teacher, images)
    assert head == "logits" and model is teacher


@pytest.mark.parametrize("variant", ["dense", "softmax", "activation"])
def test_softmax_head_equals_its_logits_twin(images, student_logits, variant):
    logits_teacher, variants = _head_variants()
    twin = variants[variant]
    ref = logits_teacher.predict(images, verbose=0)
    assert np.abs(ref).max() > 3  # logits that a softmax would squash noticeably
    # The twin really outputs probabilities.
    np.testing.assert_allclose(twin.predict(images, verbose=0).sum(-1), 1.0, atol=1e-5)

    cut, head = logits_model(twin)  # structural cut: no sample needed
    assert head == "softmax"
    np.testing.assert_allclose(cut.predict(images, verbose=0), ref, rtol=1e-5, atol=1e-5)

    adapted, info = adapt_teacher(twin, (28, 28, 1), K, MNIST_SCALE, 0.0)
    assert info == {"head": "softmax", "input_shape": [28, 28, 1], "scale": MNIST_SCALE, "offset": 0.0,
                    "resized": False}
    assert not adapted.trainable and adapted.trainable_weights == []
    out = adapted.predict(images, verbose=0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for T in (1.0, 4.0):
        np.testing.assert_allclose(_hinton(out, student_logits, T), _np_hinton(ref, student_logits, T), rtol=1e-5)
    # The cut teacher is a new model: the user's twin still gives probabilities.
    np.testing.assert_allclose(twin.predict(images, verbose=0).sum(-1), 1.0, atol=1e-5)


class _ProbabilityTeacher(keras.Model):
    """A subclassed teacher (no graph to cut) whose output is probabilities."""

    def __init__(self, logits_teacher):
        super().__init__(name="subclassed")
        self.inner = logits_teacher

    def call(self, x, training=None):
        return tf.nn.softmax(self.inner(x, training=training))


def _nested_probability_teacher(logits_teacher):
    """A Functional model whose last layer is a nested Model ending in softmax (not cut structurally)."""
    inner = keras.Model(logits_teacher.inputs, keras.layers.Softmax()(logits_teacher.outputs[0]), name="inner")
    inp = keras.Input((28, 28, 1))
    return keras.Model(inp, inner(inp), name="nested")


def test_probabilities_fallback_for_a_nested_teacher(images, student_logits):
    logits_teacher, _ = _head_variants()
    ref = logits_teacher.predict(images, verbose=0)
    nested = _nested_probability_teacher(logits_teacher)
    adapted, info = adapt_teacher(nested, (28, 28, 1), K, MNIST_SCALE, 0.0, sample=images[:8])
    assert info["head"] == "probabilities"
    out = adapted.predict(images, verbose=0)
    # log p = logits − logsumexp(logits): the same logits up to a per-row shift, so the same softmax(·/T).
    np.testing.assert_allclose(out, np_log_softmax(ref), atol=1e-4)
    for T in (1.0, 2.0, 4.0, 10.0):
        np.testing.assert_allclose(_hinton(out, student_logits, T), _np_hinton(ref, student_logits, T),
                                   rtol=1e-4, atol=1e-6)


def test_probabilities_fallback_for_a_subclassed_teacher(images, student_logits):
    logits_teacher, _ = _head_variants()
    ref = logits_teacher.predict(images, verbose=0)
    sub = _ProbabilityTeacher(logits_teacher)
    model, head = logits_model(sub, images[:8])
    assert head == "probabilities"
    out = model.predict(images, verbose=0)
    np.testing.assert_allclose(out, np_log_softmax(ref), atol=1e-4)
    np.testing.assert_allclose(_hinton(out, student_logits, 4.0), _np_hinton(ref, student_logits, 4.0), rtol=1e-4)


def test_a_subclassed_teacher_is_a_user_error_for_adapt_teacher(images):
    logits_teacher, _ = _head_variants()
    sub = _ProbabilityTeacher(logits_teacher)
    sub(images[:2])
    with pytest.raises(UserError, match="Functional or Sequential") as info:
        adapt_teacher(sub, (28, 28, 1), K, MNIST_SCALE, 0.0, sample=images[:8])
    assert "\n" not in str(info.value)


def test_logits_that_merely_look_like_probabilities_need_a_sample():
    # Without a sample, an uncuttable model is taken as giving logits.
    logits_teacher, _ = _head_variants()
    nested = _nested_probability_teacher(logits_teacher)
    model, head = logits_model(nested)
    assert head == "logits" and model is nested


def _teacher_32(channels=1, classes=K):
    inp = keras.Input((32, 32, channels))
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(5))(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(classes, kernel_initializer=keras.initializers.GlorotUniform(6),
                             bias_initializer=keras.initializers.RandomNormal(seed=7))(x)
    return keras.Model(inp, out, name="teacher32")


def test_adapter_resizes_and_renormalises_for_the_teacher():
    teacher = _teacher_32()
    x = np.random.default_rng(2).random((16, 28, 28, 1)).astype(np.float32)  # student data on [0, 1]
    adapted, info = adapt_teacher(teacher, (28, 28, 1), K, data_scale=MNIST_SCALE, data_offset=0.0,
                                  teacher_scale=2.0 / 255.0, teacher_offset=-1.0)
    assert info == {"head": "logits", "input_shape": [32, 32, 1], "scale": 2.0 / 255.0, "offset": -1.0,
                    "resized": True}
    assert adapted.input_shape == (None, 28, 28, 1)
    expected = teacher(tf.image.resize(x, (32, 32)) * 2.0 - 1.0, training=False).numpy()
    np.testing.assert_allclose(adapted(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    # The adapter really changes something: the bare teacher on [0, 1] inputs differs.
    plain = teacher(tf.image.resize(x, (32, 32)), training=False).numpy()
    assert np.abs(plain - expected).max() > 1e-2


def test_flip_average_is_the_mean_of_the_logits_of_the_image_and_of_its_mirror(images):
    from edge_kd import train

    logits_teacher, variants = _head_variants((28, 32, 1))
    x = np.random.default_rng(3).random((8, 28, 32, 1)).astype(np.float32)
    # numpy's mirror (the width axis reversed) through the logits twin is the reference; the softmax head is cut
    expected = (logits_teacher.predict(x, verbose=0) + logits_teacher.predict(x[:, :, ::-1], verbose=0)) / 2
    adapted, info = adapt_teacher(variants["dense"], (28, 32, 1), K, MNIST_SCALE, 0.0, flip_average=True)
    assert info["flip_average"] is True and info["head"] == "softmax"
    np.testing.assert_allclose(adapted(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - logits_teacher.predict(x, verbose=0)).max() > 1e-2  # the mirror changes the logits
    # the copy a mixed-precision stage trains with is rebuilt from the config, mirror included
    copy = train.computing_in(adapted, "mixed_bfloat16")
    assert copy is not adapted and "teacher_mirror" in {layer.name for layer in copy.layers}
    # what gives the averaged logits stays float32 (the head of the teacher both views run through), the body not
    inner = next(layer for layer in copy.layers if isinstance(layer, keras.Model))
    assert inner.layers[-1].compute_dtype == "float32" and inner.get_layer("conv").compute_dtype == "bfloat16"
    assert copy.get_layer("teacher_flip_average").compute_dtype == "float32"
    np.testing.assert_allclose(copy(x, training=False).numpy(), expected, rtol=0.05, atol=0.15)
    assert "flip_average" not in adapt_teacher(logits_teacher, (28, 32, 1), K, MNIST_SCALE, 0.0)[1]


def test_adapter_is_identity_when_teacher_and_student_agree(images):
    teacher, _ = _head_variants()
    adapted, info = adapt_teacher(teacher, (28, 28, 1), K, MNIST_SCALE, 0.0)
    assert info["resized"] is False
    names = [layer.name for layer in adapted.layers]
    assert "teacher_normalise" not in names and "teacher_resize" not in names
    np.testing.assert_array_equal(adapted.predict(images, verbose=0), teacher.predict(images, verbose=0))


def test_adapter_refuses_class_and_channel_mismatches():
    with pytest.raises(UserError, match="predicts 5 classes but the data has 10") as info:
        adapt_teacher(_teacher_32(classes=5), (28, 28, 1), K, MNIST_SCALE, 0.0)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="3 channel") as info:
        adapt_teacher(_teacher_32(channels=3), (28, 28, 1), K, MNIST_SCALE, 0.0)
    assert "\n" not in str(info.value)
    flat = keras.Sequential([keras.Input((784,)), keras.layers.Dense(K)])
    with pytest.raises(UserError, match="images"):
        adapt_teacher(flat, (28, 28, 1), K, MNIST_SCALE, 0.0)


# --- load_teacher -----------------------------------------------------------------------------------------


def _lambda_model():
    inp = keras.Input((6,))
    x = keras.layers.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(inp)
    out = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(0))(x)
    return keras.Model(inp, out)


def _plain_model():
    inp = keras.Input((6,))
    out = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(0))(inp)
    return keras.Model(inp, out)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_teacher_needs_trust(tmp_path, suffix):
    model = _lambda_model()
    path = tmp_path / f"teacher{suffix}"
    model.save(path)
    with pytest.raises(UserError, match="--trust-teacher") as info:
        load_teacher(path)
    assert "\n" not in str(info.value)
    loaded = load_teacher(path, trust=True)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    kernel, bias = model.layers[-1].get_weights()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), (x * 2.0 + 1.0) @ kernel + bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".hdf5"])
def test_plain_teacher_loads_safely(tmp_path, suffix):
    model = _plain_model()
    path = tmp_path / f"teacher{suffix}"
    model.save(path)
    loaded = load_teacher(str(path))
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, words", [
    ("missing.keras", ["not found", "missing.keras"]),
    ("corrupt.keras", ["cannot", "corrupt.keras"]),
    ("corrupt.h5", ["cannot", "corrupt.h5"]),
    ("teacher.pt", [".keras or .h5", "teacher.pt"]),
])
def test_load_teacher_user_errors_are_one_line(tmp_path, name, words):
    path = tmp_path / name
    if name != "missing.keras":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(UserError) as info:
        load_teacher(path)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_corrupt_zip_named_keras_is_a_user_error(tmp_path):
    # A real zip archive that is not a Keras model (no config.json inside).
    import zipfile

    path = tmp_path / "notamodel.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(UserError, match="notamodel.keras") as info:
        load_teacher(path)
    assert "\n" not in str(info.value)


def test_a_folder_is_not_a_teacher(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_teacher(tmp_path)
