"""Weight clustering of Conv2D and Dense kernels with tensorflow-model-optimization, trained in the Distiller.

``cluster`` wraps each clusterable layer in tfmot's ``ClusterWeights`` (named ``cluster_<name>``; the
wrapped layer keeps its original name): its kernel is then drawn from ``clusters`` trainable centroids.
With ``preserve_sparsity`` the zeros of a pruned kernel stay zero (tfmot keeps a zero centroid and a
mask). ``strip`` returns the plain model whose kernels hold at most ``clusters`` distinct values; a
later ``qat.quantize(..., QATConfig(preserve_clusters=True))`` keeps them through QAT (PCQAT).

Example (runnable; a real run distils from a teacher)::

    import numpy as np
    import models
    from edge_kd.tfmot import cluster
    from edge_kd.distill import Distiller

    student = models.build("cnn", (28, 28, 1), 10)
    wrapped = cluster.cluster(student, cluster.ClusterConfig(clusters=8))
    d = Distiller(wrapped)
    d.compile(optimizer="adam")
    x, y = np.random.rand(64, 28, 28, 1).astype("float32"), np.random.randint(0, 10, 64)
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    plain = cluster.strip(wrapped)
    print(len(np.unique(plain.get_layer("logits").kernel.numpy())))     # at most 8
"""
from __future__ import annotations

import dataclasses

from edge_kd.tfmot import common
from edge_kd.tfmot.config import ClusterConfig
from edge_kd.errors import UserError
from edge_kd.keras import keras

import tensorflow_model_optimization as tfmot  # noqa: E402  (after edge_kd.keras: resolves to tf_keras)

_INITS = {
    "kmeans_plus_plus": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
    "density_based": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
    "linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
    "random": tfmot.clustering.keras.CentroidInitialization.RANDOM,
}
CLUSTERABLE = (keras.layers.Conv2D, keras.layers.Dense)


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """What ``cluster`` does: the layers it wraps, and the layers with kernels it leaves alone with why."""

    clustered: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def plan(model, cfg: ClusterConfig) -> ClusterPlan:
    """Returns the ClusterPlan of clustering ``model`` with ``cfg``."""
    common.require_graph_model(model, "clustering")
    clustered, skipped = [], []
    for layer in common.iter_layers(model):
        reason = _skip_reason(layer, cfg)
        if reason is None:
            clustered.append(layer.name)
        elif reason:
            skipped.append((layer.name, reason))
    return ClusterPlan(tuple(clustered), tuple(skipped))


def check(model, cfg: ClusterConfig) -> ClusterPlan:
    """Returns the ClusterPlan, raising the UserError ``cluster`` would raise (so a run can fail before it trains)."""
    common.require_graph_model(model, "clustering")
    common.refuse_wrapped(model, "clustering")
    p = plan(model, cfg)
    if not p.clustered:
        why = "; ".join(f"{n}: {r}" for n, r in p.skipped) or "it has no Conv2D or Dense layer"
        raise UserError(f"nothing to cluster in model {model.name!r} ({why})")
    return p


def cluster(model, cfg: ClusterConfig | None = None) -> keras.Model:
    """Returns a copy of ``model`` with its clusterable layers wrapped for clustering; ``.cluster_plan`` says which."""
    cfg = cfg or ClusterConfig()
    p = check(model, cfg)
    chosen = {id(layer) for layer in common.iter_layers(model) if _skip_reason(layer, cfg) is None}

    def wrap(fresh, original):
        if id(original) in chosen:
            return tfmot.clustering.keras.cluster_weights(fresh, number_of_clusters=cfg.clusters,
                                                          cluster_centroids_init=_INITS[cfg.init],
                                                          preserve_sparsity=cfg.preserve_sparsity)
        return fresh

    wrapped = common.clone_with(model, wrap)
    wrapped.cluster_plan = p
    return wrapped


def strip(model) -> keras.Model:
    """Returns a plain copy of a clustering-wrapped ``model``: each wrapper replaced by its layer with clustered weights."""
    common.require_graph_model(model, "cluster.strip")
    with keras.utils.custom_object_scope(common.custom_objects(model)):
        stripped = tfmot.clustering.keras.strip_clustering(model)
    return common.clone_with(stripped)


def _skip_reason(layer, cfg: ClusterConfig) -> str | None:
    """None: cluster it; "": not a kernel layer, not worth a mention; else why a layer with a kernel is left alone."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "tfmot 0.8.1 clusters no weight of DepthwiseConv2D (its ClusteringRegistry lists none)"
    if type(layer) in CLUSTERABLE:
        size = int(layer.kernel.shape.num_elements())
        if size <= cfg.clusters:
            return f"its kernel has {size} weights, not more than the {cfg.clusters} clusters"
        return None
    if isinstance(layer, keras.Model) or not any("kernel" in w.name or "embeddings" in w.name for w in layer.weights):
        return ""
    return f"{type(layer).__name__} is not clustered (edge-kd clusters Conv2D and Dense)"
