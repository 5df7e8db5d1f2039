"""The architecture registry: every model builds, gives logits, and converts to TFLite faithfully."""
import numpy as np
import pytest

import models
from edge_kd.bench.litert import TFLiteModel
from edge_kd.tfmot import prune, qat
from edge_kd.tfmot.config import PruneConfig, QATConfig
from edge_kd.errors import UserError
from edge_kd.export.tflite import convert
from edge_kd.keras import keras

SHAPES = [(28, 28, 1), (32, 32, 3)]


def test_registry_lists_the_documented_models():
    assert models.available() == sorted(models.available())
    assert {"mlp", "cnn", "cnn_large", "resnet8", "mobilenet"} <= set(models.available())


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name", [n for n in models.available() if n not in models.APPLICATIONS])
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
    # stem 3×3×1→8 + BN; per width w (from c): 3×3×c→w + BN, 3×3×w→w + BN; max-pooled w → 10
    ("fastcnn", {"widths": (8, 16), "stem": 8},
     9 * 8 + 32 + (9 * 8 * 8 + 32 + 9 * 8 * 8 + 32) + (9 * 8 * 16 + 64 + 9 * 16 * 16 + 64) + 16 * 10 + 10),
])
def test_parameter_counts_follow_the_options(name, kw, ref):
    assert models.build(name, (28, 28, 1), 10, **kw).count_params() == ref


def test_fastcnn_halves_the_map_per_block_and_has_its_documented_size():
    model = models.build("fastcnn", (32, 32, 3), 10)
    assert model.count_params() == 1_980_384 + 10  # 1.98 M (the logits keep their bias)
    assert model.get_layer("block3_b_relu").output_shape == (None, 4, 4, 256)


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


#: each keras.applications model at its smallest options, for the tests that convert it
APPS = {"mobilenet_v2": {"alpha": 0.35}, "mobilenet_v3_small": {"alpha": 0.75, "minimalistic": True},
        "mobilenet_v3_large": {"alpha": 0.75}, "efficientnet_b0": {}, "resnet50_v2": {}}
#: the layer classes tfmot 0.8.1's sparsity-preserving 8-bit scheme cannot quantize in each (the input's Rescaling
#: in all; hard-swish and squeeze-excite as TFOpLambda and Multiply; EfficientNet's Normalization; ResNet50V2's
#: pre-activation BatchNormalization, which follows no convolution)
NOT_QUANTIZABLE = {"mobilenet_v2": {"Rescaling"}, "mobilenet_v3_small": {"Rescaling"},
                   "mobilenet_v3_large": {"Multiply", "Rescaling", "TFOpLambda"},
                   "efficientnet_b0": {"Multiply", "Normalization", "Rescaling"},
                   "resnet50_v2": {"BatchNormalization", "Rescaling"}}


def test_the_keras_applications_are_registered_under_their_names():
    assert set(APPS) == set(models.APPLICATIONS) <= set(models.available())
    assert models.options_of("mobilenet_v3_small") == ["alpha", "minimalistic", "dropout", "bn_momentum"]
    m = models.build("mobilenet_v2", (32, 32, 3), 3, alpha=0.35, bn_momentum=0.99)
    assert {layer.momentum for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.99}
    # keras.applications builds a MobileNetV3 only from 32×32: a smaller input (Fashion-MNIST's 28×28×1) is scaled up
    # by edge-kd's own layer, which QAT leaves in float with no setting and nothing to tell; the other backbones
    # take it as it is
    assert "upscale" not in [layer.name for layer in models.build("mobilenet_v2", (28, 28, 1), 3, alpha=0.35).layers]
    m = models.build("mobilenet_v3_small", (28, 20, 1), 3, alpha=0.75, minimalistic=True)
    assert m.get_layer("upscale").output_shape == (None, 32, 32, 1) and m.output_shape == (None, 3)
    assert qat.check(m, QATConfig(unsupported="error")) == ["preprocess", "upscale"]
    assert qat.float_note(m, ["preprocess", "upscale"], QATConfig()) is None
    # a model with many such layers: counted by class, three named (the rest would make a line of thousands)
    with pytest.raises(UserError, match=r"^81 layers \(TFOpLambda ×54, Multiply ×27: [^,]+, [^,]+, [^,]+, \.\.\.\) "
                                        r"cannot be quantized by tfmot's sparsity-preserving 8-bit scheme; set"):
        qat.check(models.build("mobilenet_v3_small", (32, 32, 3), 3, alpha=0.75), QATConfig(unsupported="error"))


#: the backbones users pick as teachers, whose int8 conversion takes 20-25 s each on 2 cores: run with ``-m heavy``
#: (MobileNetV2 and MobileNetV3-Small, the students, stay in the default run)
LARGE = {"mobilenet_v3_large", "efficientnet_b0", "resnet50_v2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in LARGE else n for n in APPS])
def test_a_keras_application_builds_untrained_converts_to_int8_with_builtin_ops_and_loads_its_weights_file(
        name, tmp_path):
    from edge_kd.bench import parity

    keras.utils.set_random_seed(0)
    model = models.build(name, (32, 32, 3), 5, **APPS[name])
    assert model.output_shape == (None, 5) and model.layers[-1].name == "logits"
    assert model.get_layer("preprocess").get_config()["scale"] == models.APPLICATIONS[name][1][0]
    assert len([layer for layer in model.layers if isinstance(layer, keras.Model)]) == 0  # one flat graph
    # prunable: every Conv2D and Dense; each DepthwiseConv2D listed with why it stays dense
    plan = prune.plan(model, PruneConfig(target_sparsity=0.5), total_steps=10)
    depthwise = {layer.name for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)}
    assert "logits" in plan.pruned and {n for n, _ in plan.skipped} == depthwise
    # PQAT: the layers tfmot cannot take, by name; by default they train in float (the int8 converter quantizes
    # them), named on the terminal unless they are only edge-kd's own input scaling; qat.unsupported: error refuses
    floats = qat.check(model, QATConfig(preserve_sparsity=True))
    assert {type(model.get_layer(n)).__name__ for n in floats} == NOT_QUANTIZABLE[name] and "preprocess" in floats
    note = qat.float_note(model, floats, QATConfig(preserve_sparsity=True))
    if NOT_QUANTIZABLE[name] == {"Rescaling"}:
        assert note is None
        assert qat.check(model, QATConfig(preserve_sparsity=True, unsupported="error")) == ["preprocess"]
    else:
        assert note.startswith(f"{len(floats)} of ") and all(cls in note for cls in NOT_QUANTIZABLE[name])
        if name == "mobilenet_v3_large":  # the refusal is the same code for every backbone (3-5 s each to check)
            with pytest.raises(UserError, match="set qat.unsupported: float"):
                qat.check(model, QATConfig(preserve_sparsity=True, unsupported="error"))
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
    flat = convert(model, "int8", representative=x)
    (tmp_path / "m.tflite").write_bytes(flat)
    ops = parity.ops(tmp_path / "m.tflite")
    assert not [op for op in ops["ops"] if op.startswith("CUSTOM") or op == "FlexDelegate"], ops
    assert TFLiteModel(flat).predict(x).shape == (4, 5)
    # a user's weights file fills the same architecture, layer by layer
    model.save_weights(tmp_path / "w.h5")
    keras.utils.set_random_seed(1)
    fresh = models.build(name, (32, 32, 3), 5, **APPS[name])
    models.load_weights(fresh, tmp_path / "w.h5", "student.weights")
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_weights_file_of_another_architecture_is_a_one_line_error(tmp_path):
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="other")]).save_weights(tmp_path / "other.h5")
    models.build("cnn", (32, 32, 3), 5).save_weights(tmp_path / "cnn.h5")  # its logits layer is 1536 wide
    models.build("mobilenet_v2", (32, 32, 3), 7, alpha=0.35).save_weights(tmp_path / "seven.h5")
    (tmp_path / "w.keras").write_bytes(b"")
    target = models.build("mobilenet_v2", (32, 32, 3), 5, alpha=0.35)
    for file, words in (("other.h5", "no weights of a layer"), ("cnn.h5", "(1536, 5)"), ("seven.h5", "does not match"),
                        ("missing.h5", "not found"), ("w.keras", "expected a Keras weights file")):
        with pytest.raises(UserError) as e:
            models.load_weights(target, tmp_path / file, "student.weights")
        assert str(e.value).startswith("student.weights: ") and words in str(e.value) and "\n" not in str(e.value)



def test_hints_and_attention_tap_keras_application_layers_by_name():
    from edge_kd.distill import Distiller, adapt_teacher, losses

    keras.utils.set_random_seed(0)
    teacher = models.build("mobilenet_v3_small", (48, 48, 3), 4, alpha=0.75, minimalistic=True)
    adapted, _ = adapt_teacher(teacher, (32, 32, 3), 4, 1 / 255, 0.0)  # a larger teacher, behind the adapter
    student = models.build("mobilenet_v2", (32, 32, 3), 4, alpha=0.35)
    terms = [losses.get("fitnet", student_layer="block_6_expand_relu", teacher_layer="expanded_conv_2/project",
                        weight=0.5),
             losses.get("at", pairs=[["block_3_expand_relu", "expanded_conv_1/expand"]], weight=0.5)]
    d = Distiller(student, [adapted], terms=terms)
    d.compile(optimizer="adam")
    x = np.random.default_rng(0).random((16, 32, 32, 3)).astype(np.float32)
    logs = d.fit(x, np.arange(16) % 4, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][-1]) and logs["fitnet"][-1] > 0 and logs["at"][-1] > 0
