"""Pruning inside the Distiller: schedule, UpdatePruningStep through the Distiller, sparse TFLite exports, 2:4."""
import numpy as np
import pytest

import models
from edge_kd.bench import litert
from edge_kd.bench.stats import tflite_weight_sparsity
from edge_kd.tfmot import prune
from edge_kd.distill import taps
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf

import tensorflow_model_optimization as tfmot  # noqa: E402  (after edge_kd.keras)
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils  # noqa: E402

from .helpers import PRUNE_STEPS, distiller, export, infer, kernel_layers, tflite_by_layer

PRUNED = ("block1_conv", "block2_conv", "logits")


def test_prune_in_distiller_reaches_75_percent_in_keras_and_both_tflite_exports(pruned_student, mnist, tmp_path):
    run = pruned_student
    (x, _), _, (xt, yt) = mnist
    assert run.wrapped.prune_plan.pruned == PRUNED
    assert (run.wrapped.prune_plan.begin_step, run.wrapped.prune_plan.end_step) == (0, 200)
    for name in PRUNED:
        wrapper = taps.find_layer(run.wrapped, name)
        assert wrapper.name == f"prune_low_magnitude_{name}" and wrapper.layer.name == name
        # UpdatePruningStep found the wrappers through the Distiller and counted every training step.
        assert int(wrapper.pruning_step.numpy()) == PRUNE_STEPS
        mask = wrapper.pruning_vars[0][1].numpy()
        assert 1.0 - mask.mean() == pytest.approx(0.75, abs=0.01)
    # The input model was copied, not pruned in place.
    for before, now in zip(run.original_weights, run.original.get_weights()):
        np.testing.assert_array_equal(before, now)

    kernels = kernel_layers(run.stripped)
    assert set(kernels) == set(PRUNED)
    assert not any(isinstance(l, keras.layers.Wrapper) for l in run.stripped.layers)
    for name, k in kernels.items():
        assert np.mean(k == 0) == pytest.approx(0.75, abs=0.01), name
    assert run.history["val_accuracy"][-1] > 0.8, run.history["val_accuracy"]

    fp32 = export(run.stripped, "fp32", tmp_path / "pruned-fp32.tflite")
    int8 = export(run.stripped, "int8", tmp_path / "pruned-int8.tflite", representative=x[:200])
    for path in (fp32, int8):
        measured = tflite_weight_sparsity(path)
        assert len(measured["layers"]) == 3
        for layer in measured["layers"].values():
            assert layer["sparsity"] == pytest.approx(0.75, abs=0.01), (path.name, layer)
        assert measured["overall"] == pytest.approx(0.75, abs=0.01)
        # The zeros are the Keras kernel's zeros (BN folding scales output channels, it moves no zero).
        for name, (_, detail, w) in tflite_by_layer(path, kernels).items():
            zero = 0 if w.dtype == np.float32 else detail["quantization_parameters"]["zero_points"][0]
            np.testing.assert_array_equal(w == zero, kernels[name] == 0)
    # The fp32 file computes what the stripped Keras model computes; the int8 one keeps its accuracy.
    np.testing.assert_allclose(litert.TFLiteModel(fp32).predict(xt), infer(run.stripped, xt), atol=1e-4)
    keras_acc = float(np.mean(infer(run.stripped, xt).argmax(1) == yt))
    assert litert.accuracy(int8, xt, yt) == pytest.approx(keras_acc, abs=0.02)


def test_structured_2_4_every_group_of_4_input_weights_has_2_zeros_in_the_tflite(mnist, teacher, tmp_path):
    (x, y), _, _ = mnist
    keras.utils.set_random_seed(2)
    student = models.build("cnn", (28, 28, 1), 10)
    wrapped = prune.prune(student, prune.PruneConfig(structured_2_4=True), total_steps=20)
    p = wrapped.prune_plan
    assert p.pruned == ("block2_conv", "logits")
    assert p.skipped == (("block1_conv", "2:4 sparsity needs input channels in multiples of 4, it has 1"),)
    distiller(wrapped, teacher).fit(x[:360], y[:360], batch_size=18, epochs=1, verbose=0,
                                    callbacks=prune.callbacks())
    stripped = prune.strip(wrapped)
    kernels = kernel_layers(stripped)
    for variant in ("fp32", "int8"):
        path = export(stripped, variant, tmp_path / f"s24-{variant}.tflite", representative=x[:100])
        for name, (op_name, detail, w) in tflite_by_layer(path, kernels).items():
            tfl = np.transpose(w, (3, 0, 1, 2)) if op_name == "CONV_2D" else w.T   # TFLite layout, input axis last
            zero = 0 if tfl.dtype == np.float32 else detail["quantization_parameters"]["zero_points"][0]
            groups = (tfl == zero).reshape(-1, 4)                                 # consecutive input channels
            if name in p.pruned:
                assert groups.sum(axis=1).min() >= 2, (variant, name)
                assert groups.mean() == pytest.approx(0.5, abs=0.01), (variant, name)
                assert pruning_utils.is_pruned_m_by_n(tf.constant((tfl != zero).astype(np.float32)), (2, 4),
                                                      last_channel="C_IN")
            else:
                assert groups.mean() == 0.0, (variant, name)   # left dense


def test_schedule_end_step_falls_on_a_mask_update_and_within_the_run():
    model = models.build("mlp", (8, 8, 1), 4, hidden=(8,))
    assert prune.plan(model, prune.PruneConfig(frequency=50, end_step=230), 300).end_step == 200
    p = prune.plan(model, prune.PruneConfig(frequency=100, begin_step=10), 95)
    assert (p.begin_step, p.end_step, p.frequency) == (10, 95, 85)
    assert prune.plan(model, prune.PruneConfig(frequency=30), 100).end_step == 90
    with pytest.raises(UserError, match="prune.end_step 400 is beyond the 300 training steps"):
        prune.prune(model, prune.PruneConfig(end_step=400), total_steps=300)
    with pytest.raises(UserError, match="total_steps must be an integer ≥ 1, got 0"):
        prune.prune(model, prune.PruneConfig(), total_steps=0)
    schedule = prune._schedule(prune.PruneConfig(schedule="constant", frequency=10),
                               prune.plan(model, prune.PruneConfig(frequency=10), 45))
    assert isinstance(schedule, tfmot.sparsity.keras.ConstantSparsity)
    assert schedule.get_config()["config"]["end_step"] == 40


@pytest.mark.parametrize("kwargs, message", [
    ({"target_sparsity": 1.0}, "prune.target_sparsity must be a number in (0, 1), got 1.0"),
    ({"target_sparsity": "0.5"}, "prune.target_sparsity must be a number in (0, 1), got '0.5'"),
    ({"schedule": "cosine"}, "prune.schedule must be one of polynomial, constant, got 'cosine'"),
    ({"initial_sparsity": 0.8}, "prune.initial_sparsity must be below target_sparsity (0.75), got 0.8"),
    ({"begin_step": -1}, "prune.begin_step must be an integer ≥ 0, got -1"),
    ({"begin_step": 10, "end_step": 10}, "prune.end_step must be above begin_step (10), got 10"),
    ({"frequency": 2.5}, "prune.frequency must be an integer ≥ 1, got 2.5"),
    ({"structured_2_4": "yes"}, "prune.structured_2_4 must be true or false, got 'yes'"),
])
def test_config_errors_name_key_value_and_allowed(kwargs, message):
    with pytest.raises(UserError) as e:
        prune.PruneConfig(**kwargs)
    assert str(e.value) == message


def test_plan_names_layers_left_dense_and_refuses_what_tfmot_cannot_prune():
    mobile = models.build("mobilenet", (32, 32, 3), 10, width=0.25)
    p = prune.plan(mobile, prune.PruneConfig(), 100)
    assert set(p.pruned) == {l.name for l in mobile.layers if type(l) in (keras.layers.Conv2D, keras.layers.Dense)}
    assert dict(p.skipped)["ds1_dw"] == "tfmot 0.8.1 prunes no weight of DepthwiseConv2D (its PruneRegistry lists none)"
    assert len(p.skipped) == 5

    inp = keras.Input((8, 8, 4))
    only_dw = keras.Model(inp, keras.layers.DepthwiseConv2D(3, name="dw")(inp))
    with pytest.raises(UserError, match="nothing to prune in model .*dw: tfmot 0.8.1 prunes no weight"):
        prune.prune(only_dw, prune.PruneConfig(), 100)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UserError, match="needs a Functional or Sequential tf_keras model"):
        prune.prune(Sub(), prune.PruneConfig(), 100)
    wrapped = prune.prune(models.build("mlp", (8, 8, 1), 4, hidden=(8,)), prune.PruneConfig(), 100)
    with pytest.raises(UserError, match="layer 'prune_low_magnitude_fc1' carries pruning; call prune.strip"):
        prune.prune(wrapped, prune.PruneConfig(), 100)
