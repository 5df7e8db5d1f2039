"""The architecture registry: every model builds, gives logits, and converts to TFLite faithfully."""
import numpy as np
import pytest

import models
from edge_kd.bench.litert import TFLiteModel
from edge_kd.errors import UserError
from edge_kd.export.tflite import convert
from edge_kd.keras import keras

SHAPES = [(28, 28, 1), (32, 32, 3)]


def test_registry_lists_the_documented_models():
    assert models.available() == sorted(models.available())
    assert {"mlp", "cnn", "cnn_large", "resnet8", "mobilenet"} <= set(models.available())


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", models.available())
def test_builds_gives_logits_and_matches_tflite_fp32(name, shape):
    keras.utils.set_random_seed(0)
    num_classes = 7
    model = models.build(name, shape, num_classes)
    assert isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False)
    assert model.input_shape == (None, *shape) and model.output_shape == (None, num_classes)
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense) and last.activation is keras.activations.linear

    x = np.random.default_rng(1).random((5, *shape)).astype(np.float32)
    ref = model.predict(x, verbose=0)
    assert ref.shape == (5, num_classes) and np.all(np.isfinite(ref))
    # Logits, not probabilities: rows do not sum to 1 and some values are negative.
    assert np.abs(ref.sum(-1) - 1).max() > 1e-3 and ref.min() < 0

    tfl = TFLiteModel(convert(model, "fp32"))
    out = tfl.predict(x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def _np_param_count(model):
    return int(sum(np.prod(w.shape) for w in model.get_weights()))


def test_resnet8_has_mlperf_tiny_parameter_count():
    model = models.build("resnet8", (32, 32, 3), 10)
    assert model.count_params() == 78_666
    assert _np_param_count(model) == 78_666


@pytest.mark.parametrize("name, kw, ref", [
    # Flatten(784) → 32 → 10: (784·32 + 32) + (32·10 + 10)
    ("mlp", {"hidden": (32,)}, 784 * 32 + 32 + 32 * 10 + 10),
    # conv 3×3×1→12 (no bias) + BN(12) 4·12, conv 3×3×12→24 + BN 4·24, flatten 7·7·24 → 10
    ("cnn", {}, 9 * 12 + 48 + 9 * 12 * 24 + 96 + 7 * 7 * 24 * 10 + 10),
    ("cnn", {"width": 0.5, "head": "gap"}, 9 * 8 + 32 + 9 * 8 * 12 + 48 + 12 * 10 + 10),
])
def test_parameter_counts_follow_the_options(name, kw, ref):
    assert models.build(name, (28, 28, 1), 10, **kw).count_params() == ref


def test_mobilenet_stem_strides_only_on_larger_inputs():
    small = models.build("mobilenet", (28, 28, 1), 10)
    large = models.build("mobilenet", (32, 32, 3), 10)
    assert small.get_layer("stem_relu").output_shape == (None, 28, 28, 16)
    assert large.get_layer("stem_relu").output_shape == (None, 16, 16, 16)


@pytest.mark.parametrize("name, kw, words", [
    ("vgg99", {}, ["vgg99", "resnet8", "mlp"]),
    ("cnn", {"depth": 3}, ["depth", "width"]),
    ("cnn", {"head": "avg"}, ["head", "avg"]),
])
def test_unknown_model_or_option_is_a_user_error(name, kw, words):
    with pytest.raises(UserError) as info:
        models.build(name, (28, 28, 1), 10, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg
