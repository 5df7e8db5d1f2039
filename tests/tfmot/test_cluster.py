"""Clustering inside the Distiller: at most N distinct kernel values, pruned zeros kept, PCQAT to int8, reload."""
import numpy as np
import pytest

from edge_kd.bench import litert
from edge_kd.bench.stats import tflite_weight_sparsity
from edge_kd.tfmot import cluster, qat
from edge_kd.distill import taps
from edge_kd.errors import UserError
from edge_kd.keras import keras

from .helpers import distiller, export, infer, kernel_layers, tflite_by_layer

CLUSTERS = 8


def test_sparsity_preserving_clustering_then_pcqat_to_int8(pruned_student, teacher, mnist, tmp_path):
    (x, y), _, (xt, yt) = mnist
    pruned = kernel_layers(pruned_student.stripped)
    keras.utils.set_random_seed(5)
    wrapped = cluster.cluster(pruned_student.stripped, cluster.ClusterConfig(clusters=CLUSTERS, preserve_sparsity=True))
    assert wrapped.cluster_plan.clustered == ("block1_conv", "block2_conv", "logits")
    assert [taps.find_layer(wrapped, n).name for n in wrapped.cluster_plan.clustered] == [
        "cluster_block1_conv", "cluster_block2_conv", "cluster_logits"]
    before = kernel_layers(cluster.strip(wrapped))
    distiller(wrapped, teacher, lr=5e-4).fit(x[:1080], y[:1080], batch_size=18, epochs=1, verbose=0)
    clustered = cluster.strip(wrapped)
    kernels = kernel_layers(clustered)
    assert any(not np.array_equal(before[n], kernels[n]) for n in kernels)   # the centroids trained
    for name, k in kernels.items():
        assert len(np.unique(k)) <= CLUSTERS, name
        assert np.all(k[pruned[name] == 0] == 0), name                        # pruned zeros kept
        assert np.mean(k == 0) == pytest.approx(0.75, abs=0.01), name

    cfg = qat.QATConfig(preserve_sparsity=True, preserve_clusters=True)
    keras.utils.set_random_seed(6)
    q = qat.quantize(clustered, cfg)
    distiller(q, teacher, lr=2e-4).fit(x[:720], y[:720], batch_size=18, epochs=1, verbose=0)
    path = export(q, "int8", tmp_path / "pcqat-int8.tflite", representative=x[:200])
    for name, (op_name, detail, w) in tflite_by_layer(path, kernels).items():
        assert detail["dtype"] == np.int8, name
        zero_points = detail["quantization_parameters"]["zero_points"]
        assert not np.any(zero_points), name                     # symmetric int8 weights: 0.0 is the int 0
        assert np.all(w[kernels[name] == 0] == 0), name           # zeros kept through PCQAT
        # One scale per output channel (conv) or per tensor (dense): still at most 8 values per scale.
        per_scale = w.reshape(-1, w.shape[-1]).T if op_name == "CONV_2D" else w.reshape(1, -1)
        assert max(len(np.unique(row)) for row in per_scale) <= CLUSTERS, name
    measured = tflite_weight_sparsity(path)
    assert all(layer["sparsity"] >= 0.74 for layer in measured["layers"].values()), measured
    expected = infer(q, xt[:100])
    assert np.mean(litert.TFLiteModel(path).predict(xt[:100]).argmax(1) == expected.argmax(1)) >= 0.95

    saved = tmp_path / "pcqat.keras"
    with qat.scope():
        q.save(saved)
    with pytest.raises(UserError, match="cannot rebuild a cluster-preserving QAT model .* base="):
        qat.load(saved)
    again = qat.load(saved, base=clustered, cfg=cfg)
    np.testing.assert_allclose(infer(again, xt[:100]), expected, atol=1e-6)


def test_plan_skips_small_and_depthwise_kernels():
    inp = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(2, 1, name="tiny")(inp)               # 4 weights: not more than 8 clusters
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.Conv2D(8, 3, name="conv")(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x)))
    p = cluster.plan(model, cluster.ClusterConfig(clusters=8))
    assert p.clustered == ("conv", "head")
    assert p.skipped == (("tiny", "its kernel has 4 weights, not more than the 8 clusters"),
                         ("dw", "tfmot 0.8.1 clusters no weight of DepthwiseConv2D (its ClusteringRegistry lists none)"))
    wrapped = cluster.cluster(model, cluster.ClusterConfig(clusters=8, preserve_sparsity=False, init="linear"))
    stripped = cluster.strip(wrapped)
    assert len(np.unique(stripped.get_layer("head").kernel.numpy())) <= 8
    np.testing.assert_array_equal(stripped.get_layer("tiny").kernel.numpy(), model.get_layer("tiny").kernel.numpy())


@pytest.mark.parametrize("kwargs, message", [
    ({"clusters": 2}, "cluster.clusters must be at least 3 with preserve_sparsity (one cluster is the kept zero), got 2"),
    ({"clusters": 2, "preserve_sparsity": False}, None),
    ({"clusters": 300}, "cluster.clusters must be an integer in [2, 256], got 300"),
    ({"init": "kmeans"}, "cluster.init must be one of kmeans_plus_plus, density_based, linear, random, got 'kmeans'"),
    ({"preserve_sparsity": "true"}, "cluster.preserve_sparsity must be true or false, got 'true'"),
])
def test_config_errors_name_key_value_and_allowed(kwargs, message):
    if message is None:
        assert cluster.ClusterConfig(**kwargs).clusters == 2
        return
    with pytest.raises(UserError) as e:
        cluster.ClusterConfig(**kwargs)
    assert str(e.value) == message
