"""The Keras 3 border (edge_kd/keras3.py): models and weights files written by Keras 3 (``import keras``) come in as
tf_keras twins with the same outputs; what cannot be rebuilt is one line naming the layer."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_kd.errors import UserError
from edge_kd.keras import keras as tfk
from edge_kd.keras import tf


@pytest.fixture(scope="module")
def keras3_teacher(mnist, tmp_path_factory):
    """A Keras 3 CNN with batch normalization and a softmax head, trained 2 epochs on ``mnist``'s training images
    with plain Keras 3, saved as .keras and .h5; returns (model, .keras path, .h5 path)."""
    import keras

    (x, y), _, _ = mnist
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", name="k3_conv")(inp)
    h = keras.layers.BatchNormalization(name="k3_bn")(h)
    h = keras.layers.ReLU(name="k3_relu")(h)
    h = keras.layers.MaxPooling2D(name="k3_pool")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="k3_conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="k3_gap")(h)
    out = keras.layers.Dense(10, activation="softmax", name="k3_probs")(h)
    model = keras.Model(inp, out, name="k3_teacher")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    folder = tmp_path_factory.mktemp("k3")
    model.save(folder / "t.keras")
    model.save(folder / "t.h5")
    return model, folder / "t.keras", folder / "t.h5"


def test_which_keras_wrote_a_file_is_read_from_the_file(keras3_teacher, tmp_path):
    from edge_kd import keras3

    _, keras_file, h5_file = keras3_teacher
    assert keras3.writer(keras_file).startswith("3.") and keras3.writer(h5_file).startswith("3.")
    ours = tfk.Sequential([tfk.Input((4,)), tfk.layers.Dense(2)])
    ours.save(tmp_path / "ours.keras")
    ours.save(tmp_path / "ours.h5")
    assert keras3.writer(tmp_path / "ours.keras").startswith("2.")
    assert keras3.writer(tmp_path / "ours.h5").startswith("2.")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_keras3_teacher_file_distils_from_its_exact_logits(keras3_teacher, mnist, suffix):
    from edge_kd.distill import adapt_teacher, load_teacher

    model, keras_file, h5_file = keras3_teacher
    (x, _), _, _ = mnist
    batch = x[:64]
    teacher = load_teacher(keras_file if suffix == ".keras" else h5_file)
    assert isinstance(teacher, tfk.Model)
    np.testing.assert_allclose(teacher.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-5)
    adapted, info = adapt_teacher(teacher, (28, 28, 1), 10, 1.0, 0.0, sample=batch[:8])
    assert info["head"] == "softmax"  # the head is cut off: the Distiller reads logits, not log-probabilities
    logits = adapted.predict(batch, verbose=0)
    np.testing.assert_allclose(tfk.activations.softmax(tfk.backend.constant(logits)).numpy(),
                               model.predict(batch, verbose=0), atol=1e-5)


def test_a_keras3_teacher_from_python_goes_into_the_distiller_and_its_layers_are_tapped_by_name(keras3_teacher, mnist):
    import models
    from edge_kd.distill import Distiller, losses

    model, _, _ = keras3_teacher
    (x, y), _, _ = mnist
    student = models.build("cnn", (28, 28, 1), 10, filters=[8, 16])
    fitnet = losses.get("fitnet", student_layer="block1_relu", teacher_layer="k3_relu", weight=1.0)
    d = Distiller(student, model, terms=[losses.get("hinton", temperature=2.0, weight=0.5), fitnet], hard_weight=0.5)
    assert isinstance(d.teachers[0], tfk.Model)
    # inside the Distiller, the teacher's outputs are Keras 3's own on the same batch
    np.testing.assert_allclose(d.teacher_logits(x[:32]).numpy()[:, 0], model.predict(x[:32], verbose=0), atol=1e-5)
    d.compile(optimizer=tfk.optimizers.Adam(1e-3))
    history = d.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0).history
    assert np.isfinite(history["fitnet"][0]) and history["fitnet"][0] > 0


def test_the_command_distils_a_keras3_student_file_from_a_keras3_teacher_file_through_prune_and_qat(
        keras3_teacher, tmp_path, capsys):
    import keras

    from edge_kd import data
    from pipelines import compress

    model, keras_file, _ = keras3_teacher
    keras.utils.set_random_seed(3)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="s_conv")(inp)
    h = keras.layers.BatchNormalization(name="s_bn")(h)
    h = keras.layers.ReLU(name="s_relu")(h)
    # a squeeze-and-excite gate: its Multiply is what tfmot's 8-bit schemes cannot quantize
    g = keras.layers.GlobalAveragePooling2D(keepdims=True, name="s_squeeze")(h)
    h = keras.layers.Multiply(name="s_excite")([h, keras.layers.Conv2D(8, 1, activation="sigmoid", name="s_gate")(g)])
    h = keras.layers.GlobalAveragePooling2D(name="s_gap")(h)
    student_k3 = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="s_probs")(h))
    student_k3.save(tmp_path / "s.keras")

    code = compress.main(["--teacher", str(keras_file), "--student", str(tmp_path / "s.keras"), "--data", "mnist",
                          "--limit-train", "600", "--limit-test", "200", "--epochs", "1", "--threads", "1",
                          "--out", str(tmp_path), "--run-name", "k3", "--set", "baseline=false",
                          "--set", "prune.epochs=1", "--set", "prune.frequency=2", "--set", "qat.epochs=1",
                          "--set", "export.variants=[int8]", "--set", "benchmark.min_seconds=0.05",
                          "--set", "benchmark.warmup_seconds=0.01", "--set", "benchmark.rounds=3",
                          "--set", "benchmark.layer_error_samples=16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "distil student 's.keras'" in captured.out
    # the gate trains in float with no setting, and the terminal and the report say so
    note = ("1 of 8 layers train without fake quantization, which tfmot's sparsity-preserving 8-bit scheme cannot "
            "give them (Multiply: s_excite); the int8 converter quantizes them")
    assert f"  qat: {note}" in captured.out
    assert f"Quantization-aware training (qat): {note}" in (tmp_path / "k3" / "report.md").read_text()
    rows = {m["name"]: m for m in json.loads((tmp_path / "k3" / "results.json").read_text())["models"]}
    x, y = data.load("mnist", limit_train=600, limit_test=200, seed=0).arrays("test")
    theirs = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    assert rows["teacher"]["accuracy"] == pytest.approx(theirs, abs=1e-9)
    assert rows["teacher-fp32"]["accuracy"] == pytest.approx(theirs, abs=0.006)  # TFLite's float kernels: 1 image
    assert rows["qat-int8"]["sparsity"] == pytest.approx(0.75, abs=0.01)  # the rebuilt student pruned and QAT'd
    assert rows["student"]["params"] == student_k3.count_params()

    # Keras 3 out: the distilled student also as a Keras 3 file, named in results.json and the report, which a
    # process importing nothing but Keras 3 opens and runs to the tf_keras student's outputs
    results = json.loads((tmp_path / "k3" / "results.json").read_text())
    assert results["stage_summaries"]["distill"]["keras3_file"] == "distill/student_keras3.keras"
    assert "`distill/student_keras3.keras`" in (tmp_path / "k3" / "report.md").read_text()
    student = tfk.models.load_model(tmp_path / "k3" / "distill" / "student.keras", compile=False)
    np.save(tmp_path / "x.npy", x[:16])
    np.save(tmp_path / "y.npy", student.predict(x[:16], verbose=0))
    script = ("import sys, numpy as np, keras; "
              f"m = keras.saving.load_model({str(tmp_path / 'k3' / 'distill' / 'student_keras3.keras')!r}); "
              f"d = np.abs(np.asarray(m(np.load({str(tmp_path / 'x.npy')!r}))) - np.load({str(tmp_path / 'y.npy')!r}));"
              " print(keras.__version__, float(d.max()), 'edge_kd' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, worst, imported = proc.stdout.split()
    assert version.startswith("3.") and float(worst) <= 1e-5 and imported == "False"


def test_the_student_file_becomes_the_student_with_its_weights_and_logits(keras3_teacher, mnist, tmp_path):
    from pipelines import recipe as recipe_mod
    from pipelines import run_models
    from pipelines.context import Context

    model, keras_file, _ = keras3_teacher  # a trained Keras 3 model as the student's starting point
    (x, _), _, _ = mnist
    r = recipe_mod.apply_overrides(recipe_mod.load(), ["data.source=mnist", "data.limit_train=300",
                                                       f"student.path={keras_file}"])
    student = run_models.build_student(Context(r, tmp_path / "run", "test"))
    assert isinstance(student, tfk.Model)
    logits = student.predict(x[:32], verbose=0)  # the softmax head is cut: the Distiller works on logits
    np.testing.assert_allclose(tfk.activations.softmax(tfk.backend.constant(logits)).numpy(),
                               model.predict(x[:32], verbose=0), atol=1e-5)
    with pytest.raises(UserError, match=r"takes \(28, 28, 1\) and predicts 10 classes; the data has \(32, 32, 1\)"):
        run_models.build_student(Context(recipe_mod.apply_overrides(r, ["data.image_size=[32, 32]"]), tmp_path / "r2",
                                         "test"))


def test_naming_a_model_on_the_command_line_replaces_the_recipes_choice_whole():
    from pipelines import compress

    def recipe(*argv):
        return compress.load_recipe(compress.build_parser().parse_args(list(argv)))

    r = recipe("--student", "mobilenet_v2", "--set", "student.weights=w.h5")  # a --set after it still applies
    assert (r.student.arch, r.student.options, r.student.weights, r.student.path) == ("mobilenet_v2", {}, "w.h5", None)
    r = recipe("--student", "s.keras")
    assert r.student.path == "s.keras" and r.student.weights is None and r.run_name() == "fashion_mnist-s"
    r = recipe("--teacher-arch", "resnet50_v2")
    assert (r.teacher.path, r.teacher.arch, r.teacher.options, r.teacher.weights) == (None, "resnet50_v2", {}, None)


def test_a_keras3_weights_file_fills_a_backbone_by_layer_name(tmp_path):
    import keras

    import models

    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False)
    base.save_weights(tmp_path / "backbone.weights.h5")
    student = models.build("mobilenet_v2", (32, 32, 3), 10, alpha=0.35)
    models.load_weights(student, tmp_path / "backbone.weights.h5", "student.weights")
    filled = 0
    for layer in base.layers:
        if layer.weights:
            for a, b in zip(layer.get_weights(), student.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
            filled += 1
    assert filled > 50


def _one_line(e, *needles):
    text = str(e.value)
    assert "\n" not in text and len(text) <= 300, text
    for n in needles:
        assert n in text, text


def test_what_cannot_be_rebuilt_is_one_line_naming_the_layer():
    import keras

    from edge_kd import keras3

    class Doubling(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inp = keras.Input((8, 8, 1))
    with pytest.raises(UserError) as e:
        keras3.to_tf_keras(keras.Model(inp, Doubling(name="twice")(inp)), "teacher t.keras")
    _one_line(e, "teacher t.keras", "layer 'twice' (Doubling) has no tf_keras counterpart")

    with pytest.raises(UserError) as e:
        keras3.to_tf_keras(keras.Model(inp, keras.ops.sqrt(keras.ops.add(inp, 1.0))), "teacher t.keras")
    _one_line(e, "a keras.ops call (Sqrt) in the graph", "add, subtract, multiply and divide")

    with pytest.raises(UserError) as e:  # only an Activation layer of its own is rebuilt as Keras 3 computes it
        keras3.to_tf_keras(keras.Model(inp, keras.layers.Conv2D(2, 3, activation="hard_silu", name="hs")(inp)),
                           "student s.keras")
    _one_line(e, "student s.keras", "layer 'hs'", "'hard_silu'", "hard_swish as an Activation layer")

    x = tfk.Input((8, 8, 1))
    with pytest.raises(UserError) as e:
        keras3.to_keras3(tfk.Model(x, tfk.layers.Dense(2)(tf.math.sqrt(x + 1.0))), "Keras 3 copy of s.keras")
    _one_line(e, "Keras 3 copy of s.keras", "(tf.math.sqrt in the graph) has no Keras 3 counterpart")

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UserError) as e:
        keras3.to_tf_keras(Sub(), "teacher t.keras")
    _one_line(e, "subclassed")


def test_keras_applications_backbones_rebuild_with_equal_outputs():
    import keras

    from edge_kd import keras3

    keras.utils.set_random_seed(2)
    for make in (lambda: keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
                 lambda: keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=10),
                 # hard_silu layers and keras.ops arithmetic (x + 3.0, x * (1 / 6)) in the graph
                 lambda: keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=10)):
        model = make()
        rebuilt = keras3.to_tf_keras(model, "teacher")  # checks its outputs against the original's
        assert [layer.name for layer in rebuilt.layers if layer.weights] == \
               [layer.name for layer in model.layers if layer.weights]
        ours = {layer.name for layer in rebuilt.layers}  # a feature term taps any layer by its Keras 3 name
        assert all(node.operation.name in ours for nodes in model._nodes_by_depth.values() for node in nodes)


def test_a_tf_keras_mobilenet_v3_student_has_a_keras3_copy_that_plain_keras3_loads(tmp_path):
    import keras

    import models
    from edge_kd import keras3

    built = models.build("mobilenet_v3_small", (32, 32, 3), 10)  # hard-swish as tf ops (TFOpLambda layers)
    assert any(type(layer).__name__ == "TFOpLambda" for layer in built.layers)
    built.save(tmp_path / "s.keras")  # a loaded model's nodes name some operands (x + 3.0 as y=3.0): as a run saves
    student = tfk.models.load_model(tmp_path / "s.keras", compile=False)
    keras3.save_keras3(student, tmp_path / "s_keras3.keras", "Keras 3 copy of s.keras")  # outputs checked
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32) * 255
    copy = keras.saving.load_model(tmp_path / "s_keras3.keras")
    np.testing.assert_allclose(np.asarray(copy(x)), student(x, training=False).numpy(), atol=1e-5)
    back = keras3.to_tf_keras(copy, "student s_keras3.keras", sample=x)  # and back, as a --student file comes in
    np.testing.assert_allclose(back(x, training=False).numpy(), student(x, training=False).numpy(), atol=1e-5)
