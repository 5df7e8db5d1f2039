"""Helpers shared by prune, qat, cluster and the Distiller: model checks and weight-preserving copies.

>>> import models
>>> from edge_kd.tfmot import common
>>> m = models.build("cnn", (28, 28, 1), 10)
>>> copy = common.clone_with(m)
>>> [l.name for l in copy.layers] == [l.name for l in m.layers]
True
"""
from __future__ import annotations

import numbers
from typing import Callable, Iterator

from edge_kd.errors import UserError
from edge_kd.keras import keras

# tfmot after edge_kd.keras, so that it resolves to tf_keras.
import tensorflow_model_optimization as tfmot  # noqa: E402,F401
from tensorflow_model_optimization.python.core.clustering.keras.cluster_wrapper import ClusterWeights  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.quantize_annotate import QuantizeAnnotate  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.quantize_wrapper import QuantizeWrapper  # noqa: E402
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude  # noqa: E402

# What each tfmot wrapper means to a user, for error messages.
_WRAPPER_KINDS = ((PruneLowMagnitude, "pruning", "prune.strip"),
                  (ClusterWeights, "clustering", "cluster.strip"),
                  (QuantizeWrapper, "quantization-aware training", None),
                  (QuantizeAnnotate, "quantization annotation", None),
                  (QuantizeLayer, "quantization-aware training", None))


def require_graph_model(model, action: str) -> None:
    """Returns None when ``model`` is a Functional or Sequential tf_keras model; raises UserError otherwise."""
    if not isinstance(model, keras.Model):
        raise UserError(f"{action} needs a tf_keras model, got {type(model).__name__}")
    for m in [model, *(l for l in iter_layers(model) if isinstance(l, keras.Model))]:
        if not (isinstance(m, keras.Sequential) or getattr(m, "_is_graph_network", False)):
            raise UserError(f"{action} needs a Functional or Sequential tf_keras model (tensorflow-model-optimization "
                            f"accepts no other); {m.name!r} is a subclassed {type(m).__name__}")


def refuse_wrapped(model, action: str) -> None:
    """Returns None when ``model`` holds no tfmot wrapper; raises UserError naming the first kind found."""
    for layer in iter_layers(model):
        for cls, kind, strip in _WRAPPER_KINDS:
            if isinstance(layer, cls):
                hint = f"; call {strip}(model) first" if strip else ""
                raise UserError(f"{action} needs a model without tfmot wrappers, but layer {layer.name!r} carries "
                                f"{kind}{hint}")


def iter_layers(model) -> Iterator:
    """Returns an iterator over the layers of ``model``, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def custom_objects(model) -> dict:
    """Returns ``{class name: class}`` for every layer class in ``model``, so custom layers can be rebuilt."""
    found = {}
    for layer in iter_layers(model):
        for obj in (layer, getattr(layer, "layer", None)):
            if isinstance(obj, keras.layers.Layer):
                cls = type(obj)
                found.setdefault(cls.__name__, cls)
                found.setdefault(keras.utils.get_registered_name(cls), cls)
    return found


def rebuilt_layer(layer):
    """Returns a new layer with ``layer``'s config and, when it has weights, built and holding a copy of them."""
    fresh = layer.__class__.from_config(layer.get_config())
    if layer.weights:
        shape = getattr(layer, "_build_input_shape", None)
        if shape is None:
            shape = layer.input_shape
        fresh.build(shape)
        keras.layers.Layer.build(fresh, shape)  # records the build shape, as a first call would
        fresh.set_weights(layer.get_weights())
    return fresh


def clone_with(model, wrap: Callable | None = None):
    """Returns a copy of ``model`` whose layers are rebuilt with their weights, each passed through ``wrap``.

    ``wrap(fresh, original)`` returns the layer to use (``fresh`` itself or a wrapper of it). Nothing is
    shared with ``model``, so every layer of the copy belongs to the copy's graph alone.
    """

    def fn(layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=fn)
        fresh = rebuilt_layer(layer)
        return wrap(fresh, layer) if wrap is not None else fresh

    with keras.utils.custom_object_scope(custom_objects(model)):
        return keras.models.clone_model(model, clone_function=fn)


def check_int(key: str, value, low: int) -> int:
    """Returns ``value`` as int when it is an integer ≥ ``low``; raises UserError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise UserError(f"{key} must be an integer ≥ {low}, got {value!r}")
    return int(value)
