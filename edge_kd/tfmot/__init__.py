"""Pruning, quantization-aware training and weight clustering: typed wrappers over tensorflow-model-optimization.

Each wrapped model trains inside the Distiller like any student; wrapped layers keep their original
names inside the wrappers (``edge_kd.distill.taps.find_layer`` finds them).

Example::

    from edge_kd.tfmot import cluster, prune, qat

    wrapped = prune.prune(student, prune.PruneConfig(target_sparsity=0.75), total_steps=steps)
    distiller.fit(..., callbacks=prune.callbacks())            # distiller = Distiller(wrapped, teacher, ...)
    sparse = prune.strip(wrapped)
    q = qat.quantize(sparse, qat.QATConfig(preserve_sparsity=True))   # PQAT; fit it in a Distiller too

See each module's docstring for a runnable example.
"""
# The wrappers (cluster, prune, qat) import tensorflow-model-optimization; they load when first imported.
from edge_kd.tfmot.config import ClusterConfig, PruneConfig, QATConfig

__all__ = ["ClusterConfig", "PruneConfig", "QATConfig"]
