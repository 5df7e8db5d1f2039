"""Taps: named layers found by their original name in plain, pruned, QAT-, cluster-wrapped and nested models."""
import numpy as np
import pytest

import models
from edge_kd.tfmot import cluster, prune, qat
from edge_kd.distill import taps
from edge_kd.distill.teacher import adapt_teacher
from edge_kd.errors import UserError
from edge_kd.keras import keras, tf

NAMES = ["block1_conv", "block1_relu", "block2_conv", "flatten", "logits"]


@pytest.fixture(scope="module")
def plain():
    keras.utils.set_random_seed(0)
    return models.build("cnn", (28, 28, 1), 10)


def test_taps_of_plain_pruned_qat_and_clustered_models_agree(plain, rng):
    x = rng.random((6, 28, 28, 1), dtype=np.float32)
    pruned = prune.prune(plain, prune.PruneConfig(), total_steps=100)
    quantized = qat.quantize(plain, qat.QATConfig(preserve_sparsity=False))
    clustered = cluster.cluster(plain, cluster.ClusterConfig(clusters=8))
    # Eager calls: tiny models, and no tf.function to trace per model.
    expected = [plain(x, training=False).numpy()] + [
        keras.Model(plain.inputs, plain.get_layer(n).output)(x, training=False).numpy() for n in NAMES]

    outputs = {}
    for kind, model in (("plain", plain), ("pruned", pruned), ("qat", quantized), ("clustered", clustered)):
        tapped = taps.tap_model(model, NAMES)
        assert len(tapped.outputs) == 1 + len(NAMES)
        outputs[kind] = [o.numpy() for o in tapped(x, training=False)]
        assert [o.shape for o in outputs[kind]] == [e.shape for e in expected], kind
    for got, want in zip(outputs["plain"], expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Step 0 of pruning: all masks are ones, so the pruned copy computes exactly what the plain model does.
    for got, want in zip(outputs["pruned"], expected):
        np.testing.assert_allclose(got, want, atol=1e-5)

    assert type(taps.find_layer(pruned, "block1_conv")).__name__ == "PruneLowMagnitude"
    assert taps.find_layer(pruned, "block1_conv").name == "prune_low_magnitude_block1_conv"
    assert taps.find_layer(quantized, "block1_conv").name == "quant_block1_conv"
    assert taps.find_layer(clustered, "logits").name == "cluster_logits"
    assert taps.find_layer(pruned, "block1_relu") is pruned.get_layer("block1_relu")
    assert taps.original_names(quantized)[1:] == taps.original_names(plain)   # [0]: tfmot's input quantizer


def test_taps_inside_a_nested_teacher_match_the_inner_model(rng):
    keras.utils.set_random_seed(1)
    inner = models.build("cnn_large", (32, 32, 1), 10, width=0.25)
    adapted, _ = adapt_teacher(inner, (28, 28, 1), 10, 1 / 255, 0.0)   # resizes 28 -> 32, nests `inner`
    x = rng.random((3, 28, 28, 1), dtype=np.float32)
    resized = tf.image.resize(x, (32, 32)).numpy()
    tapped = taps.tap_model(adapted, ["fc", "teacher_resize", "block2_relu"])
    logits, fc, resize, relu = [np.asarray(o) for o in tapped(x, training=False)]
    np.testing.assert_allclose(logits, adapted(x, training=False).numpy(), atol=1e-6)
    np.testing.assert_allclose(fc, keras.Model(inner.inputs, inner.get_layer("fc").output)(resized).numpy(), atol=1e-5)
    np.testing.assert_allclose(resize, resized, atol=1e-6)
    np.testing.assert_allclose(relu, keras.Model(inner.inputs, inner.get_layer("block2_relu").output)(resized).numpy(),
                               atol=1e-5)
    assert taps.find_layer(adapted, "fc") is inner.get_layer("fc")


def test_missing_name_lists_the_original_names(plain):
    pruned = prune.prune(plain, prune.PruneConfig(), total_steps=100)
    with pytest.raises(UserError) as e:
        taps.tap_model(pruned, ["block1_conv", "block9_conv"])
    assert str(e.value) == ("no layer named 'block9_conv' in model 'cnn'; available: block1_conv, block1_bn, "
                            "block1_relu, pool1, block2_conv, block2_bn, block2_relu, pool2, flatten, logits")
