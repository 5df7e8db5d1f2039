"""QAT inside the Distiller: PQAT keeps pruned zeros through int8 export, plain QAT does not; unsupported layers; save/load."""
import numpy as np
import pytest

from edge_kd.bench import litert
from edge_kd.bench.stats import tflite_weight_sparsity
from edge_kd.tfmot import prune, qat
from edge_kd.distill import taps
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf

import tensorflow_model_optimization as tfmot  # noqa: E402  (after edge_kd.keras)

from .helpers import distiller, export, infer, kernel_layers, tflite_by_layer, tflite_kernels

QAT_STEPS = 60


def _fit_qat(model, cfg, teacher, x, y, seed=3):
    keras.utils.set_random_seed(seed)
    q = qat.quantize(model, cfg)
    distiller(q, teacher, lr=5e-4).fit(x[:QAT_STEPS * 18], y[:QAT_STEPS * 18], batch_size=18, epochs=1, verbose=0)
    return q


def _assert_int8(path):
    """The file's conv/dense kernels, input and output are int8; returns the LiteRT model."""
    kinds = {detail["dtype"] for _, detail, _ in tflite_kernels(path)}
    assert kinds == {np.int8}, kinds
    model = litert.TFLiteModel(path)
    assert model.input_details["dtype"] == np.int8 and model.output_details["dtype"] == np.int8
    return model


@pytest.fixture(scope="module")
def pqat(pruned_student, teacher, mnist, tmp_path_factory):
    (x, y), _, _ = mnist
    q = _fit_qat(pruned_student.stripped, qat.QATConfig(preserve_sparsity=True), teacher, x, y)
    path = export(q, "int8", tmp_path_factory.mktemp("pqat") / "pqat-int8.tflite", representative=x[:200])
    return q, path


def test_pqat_keeps_75_percent_in_int8_and_plain_qat_loses_it(pqat, pruned_student, teacher, mnist, tmp_path):
    (x, y), _, (xt, yt) = mnist
    q, path = pqat
    assert [taps.find_layer(q, n).name for n in ("block1_conv", "block2_conv", "logits")] == [
        "quant_block1_conv", "quant_block2_conv", "quant_logits"]
    assert all(isinstance(taps.find_layer(q, n), tfmot.quantization.keras.QuantizeWrapperV2)
               for n in ("block1_conv", "block1_bn", "logits"))
    lite = _assert_int8(path)
    measured = tflite_weight_sparsity(path)
    for layer in measured["layers"].values():
        assert layer["sparsity"] == pytest.approx(0.75, abs=0.01), layer
    # Exactly the pruned positions are zero after QAT.
    pruned_kernels = kernel_layers(pruned_student.stripped)
    for name, (_, detail, w) in tflite_by_layer(path, pruned_kernels).items():
        np.testing.assert_array_equal(w == 0, pruned_kernels[name] == 0)
    # The int8 file predicts what the fake-quantized Keras model predicts.
    agree = np.mean(lite.predict(xt).argmax(1) == infer(q, xt).argmax(1))
    assert agree >= 0.97, agree
    assert litert.accuracy(path, xt, yt) > 0.8

    plain = _fit_qat(pruned_student.stripped, qat.QATConfig(preserve_sparsity=False), teacher, x, y)
    plain_path = export(plain, "int8", tmp_path / "qat-int8.tflite", representative=x[:200])
    _assert_int8(plain_path)
    assert tflite_weight_sparsity(plain_path)["overall"] < 0.5   # trained zeros drift off zero


def test_saved_qat_model_loads_back_from_keras_and_h5(pqat, pruned_student, mnist, tmp_path):
    _, _, (xt, _) = mnist
    q, path = pqat
    expected = infer(q, xt[:100])
    for suffix in (".keras", ".h5"):
        saved = tmp_path / f"qat{suffix}"
        with qat.scope():
            q.save(saved)
        loaded = qat.load(saved)
        np.testing.assert_allclose(infer(loaded, xt[:100]), expected, atol=1e-6)
        rebuilt = qat.load(saved, base=pruned_student.stripped, cfg=qat.QATConfig(preserve_sparsity=True))
        np.testing.assert_allclose(infer(rebuilt, xt[:100]), expected, atol=1e-6)
    again = export(loaded, "int8", tmp_path / "loaded-int8.tflite", representative=mnist[0][0][:200])
    assert tflite_weight_sparsity(again)["overall"] == pytest.approx(tflite_weight_sparsity(path)["overall"], abs=1e-3)

    with pytest.raises(UserError, match="QAT model file not found"):
        qat.load(tmp_path / "missing.keras")
    (tmp_path / "q.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="must be a .keras or .h5 file, got 'q.onnx'"):
        qat.load(tmp_path / "q.onnx")


class Swish(keras.layers.Layer):
    """A custom layer: the default 8-bit registry knows nothing of it."""

    def call(self, x):
        return x * tf.sigmoid(x)


def _model_with_unsupported_layers():
    keras.utils.set_random_seed(4)
    inp = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_pm1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)    # folded after the conv: supported
    x = keras.layers.ReLU(name="relu")(x)
    x = Swish(name="swish")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(x), name="odd")


def test_the_unsupported_layers_are_found_once_per_architecture_and_setting(monkeypatch):
    import collections

    found = []
    real = qat._find_unsupported
    monkeypatch.setattr(qat, "_UNSUPPORTED", collections.OrderedDict())
    monkeypatch.setattr(qat, "_find_unsupported", lambda model, cfg: found.append(model.name) or real(model, cfg))
    a, b = _model_with_unsupported_layers(), _model_with_unsupported_layers()
    b.set_weights([w + 1 for w in b.get_weights()])  # the same layers, other weights
    assert qat.check(a, qat.QATConfig()) == qat.check(b, qat.QATConfig()) == ["swish", "to_pm1"]
    assert len(found) == 1
    # the answer names the model's own layers, not the first model's
    assert all(layer in b.layers for layer in qat._unsupported(b, qat.QATConfig()))
    qat.check(a, qat.QATConfig(preserve_sparsity=False))  # another setting: found anew
    keras.utils.set_random_seed(4)
    inp = keras.Input((28, 28, 1), name="image")
    other = keras.Model(inp, keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flatten")(inp)),
                        name="odd")
    assert qat.check(other, qat.QATConfig()) == []  # another architecture of the same name: found anew
    assert len(found) == 3


def test_unsupported_layers_are_named_or_left_in_float(teacher, mnist, tmp_path):
    (x, y), _, (xt, _) = mnist
    model = _model_with_unsupported_layers()
    assert qat.unsupported_layers(model) == [("to_pm1", "Rescaling"), ("swish", "Swish")]
    assert qat.unsupported_layers(model, qat.QATConfig(preserve_sparsity=False)) == [
        ("to_pm1", "Rescaling"), ("swish", "Swish")]
    with pytest.raises(UserError) as e:
        qat.quantize(model, qat.QATConfig(unsupported="error"))
    assert str(e.value) == ("layers to_pm1 (Rescaling), swish (Swish) cannot be quantized by tfmot's "
                            "sparsity-preserving 8-bit scheme; set qat.unsupported: float to leave them in float")
    # by default they train in float, and the note the run prints names them
    assert qat.check(model, qat.QATConfig()) == ["swish", "to_pm1"]
    assert qat.float_note(model, ["swish", "to_pm1"], qat.QATConfig()) == (
        "2 of 7 layers train without fake quantization, which tfmot's sparsity-preserving 8-bit scheme cannot give "
        "them (Rescaling, Swish: to_pm1, swish); the int8 converter quantizes them from the representative images "
        "(qat.unsupported: error refuses such a model instead)")

    q = _fit_qat(model, qat.QATConfig(), teacher, x, y)
    assert q.qat_float_layers == ("swish", "to_pm1")
    assert type(taps.find_layer(q, "swish")) is Swish
    assert type(taps.find_layer(q, "to_pm1")) is keras.layers.Rescaling
    assert all(isinstance(taps.find_layer(q, n), tfmot.quantization.keras.QuantizeWrapperV2)
               for n in ("conv", "bn", "relu", "logits"))
    features = taps.tap_model(q, ["swish", "conv"])(xt[:4])
    assert [tuple(f.shape) for f in features] == [(4, 10), (4, 13, 13, 8), (4, 13, 13, 8)]

    path = export(q, "int8", tmp_path / "odd-int8.tflite", representative=x[:200])
    lite = _assert_int8(path)
    agree = np.mean(lite.predict(xt).argmax(1) == infer(q, xt).argmax(1))
    assert agree >= 0.9, agree


@pytest.mark.parametrize("kwargs, message", [
    ({"unsupported": "skip"}, "qat.unsupported must be one of error, float, got 'skip'"),
    ({"preserve_sparsity": 1}, "qat.preserve_sparsity must be true or false, got 1"),
    ({"preserve_clusters": "no"}, "qat.preserve_clusters must be true or false, got 'no'"),
])
def test_config_errors_name_key_value_and_allowed(kwargs, message):
    with pytest.raises(UserError) as e:
        qat.QATConfig(**kwargs)
    assert str(e.value) == message


def test_quantize_refuses_wrapped_and_nested_models():
    import models

    student = models.build("mlp", (8, 8, 1), 4, hidden=(8,))
    with pytest.raises(UserError, match="layer 'prune_low_magnitude_fc1' carries pruning; call prune.strip"):
        qat.quantize(prune.prune(student, prune.PruneConfig(), 10))
    inp = keras.Input((8, 8, 1))
    nested = keras.Model(inp, student(inp), name="outer")
    with pytest.raises(UserError, match="needs a flat model .*'outer' nests mlp"):
        qat.quantize(nested)
    selu = keras.Model(inp, keras.layers.Dense(3, activation="selu", name="d")(keras.layers.Flatten()(inp)), name="m")
    with pytest.raises(UserError, match="scheme cannot quantize model 'm': Only some Keras activations"):
        qat.quantize(selu)
