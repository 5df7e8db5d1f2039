"""Reading named intermediate layers ("taps") of a teacher or student, wrapped by tfmot or not.

A layer is named by its ORIGINAL name. Pruning, QAT and clustering wrap layers and rename the wrapper
(``prune_low_magnitude_<name>``, ``quant_<name>``, ``cluster_<name>``) while the wrapped layer keeps
``<name>``; ``find_layer`` finds the wrapper by it, and also looks inside nested models (an adapted
teacher nests the user's model).

>>> import models
>>> from edge_kd.distill import taps
>>> m = models.build("cnn", (28, 28, 1), 10)
>>> tm = taps.tap_model(m, ["block1_relu", "block2_relu"])
>>> [tuple(t.shape) for t in tm.outputs]
[(None, 10), (None, 28, 28, 12), (None, 14, 14, 24)]
"""
from __future__ import annotations

from typing import Sequence

from edge_kd.errors import UserError
from edge_kd.keras import keras, tf

_MAX_LISTED = 60


def find_layer(model, name: str):
    """Returns the layer of ``model`` (a wrapper, for a wrapped layer) whose original name is ``name``."""
    return _path(model, name)[-1]


def original_names(model) -> list[str]:
    """Returns the original names of the layers of ``model`` and of the models nested in it, in order."""
    names = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        names.append(_original_name(layer))
        if isinstance(layer, keras.Model):
            names.extend(original_names(layer))
    return list(dict.fromkeys(names))


def tap_model(model, names: Sequence[str]) -> keras.Model:
    """Returns a Functional model with outputs ``[*model.outputs, *(output of each named layer)]``, sharing weights."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not (isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False) and model.inputs):
        raise UserError(f"taps need a Functional or Sequential model with a known input; got "
                        f"{type(model).__name__} {getattr(model, 'name', '')!r}")
    paths = [_path(model, n) for n in names]
    if all(len(p) == 1 for p in paths):
        # Every tap is a layer of this graph: its output tensor is already there, nothing is re-run.
        features = [_node_output(model, p[0], n) for p, n in zip(paths, names)]
        return keras.Model(model.inputs, [*model.outputs, *features], name=f"{model.name}_taps")
    return _rerun_with_taps(model, names, paths)


def _path(model, name: str) -> list:
    """Returns [layer] or [nested model, ..., layer] leading to the layer whose original name is ``name``."""
    found = _search(model, name)
    if found is None:
        available = original_names(model)
        listed = ", ".join(available[:_MAX_LISTED]) + (f", ... ({len(available)} in all)"
                                                      if len(available) > _MAX_LISTED else "")
        raise UserError(f"no layer named '{name}' in model '{model.name}'; available: {listed}")
    return found


def _search(model, name: str):
    layers = model.layers
    for layer in layers:
        if layer.name == name:
            return [layer]
    for layer in layers:
        if isinstance(layer, keras.layers.Wrapper) and layer.layer.name == name:
            return [layer]
    for layer in layers:
        if isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False):
            inner = _search(layer, name)
            if inner is not None:
                return [layer, *inner]
    return None


def _original_name(layer) -> str:
    return layer.layer.name if isinstance(layer, keras.layers.Wrapper) else layer.name


def _nodes_in(model, layer) -> list:
    # A layer may also have been called in other graphs (tfmot's cloning shares layers); only this one counts.
    return [node for nodes in model._nodes_by_depth.values() for node in nodes if node.layer is layer]


def _node_output(model, layer, name: str):
    nodes = _nodes_in(model, layer)
    if len(nodes) != 1:
        raise UserError(f"layer '{name}' is called {len(nodes)} times in model '{model.name}'; a tap needs a layer "
                        "called once")
    outputs = tf.nest.flatten(nodes[0].outputs)
    if len(outputs) != 1:
        raise UserError(f"layer '{name}' has {len(outputs)} outputs; a tap needs a layer with one")
    return outputs[0]


class _Reusable:
    """A computed tensor that ``Node.map_arguments`` may take any number of times."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def pop(self):
        return self.value


def _rerun_with_taps(model, names, paths) -> keras.Model:
    """Re-runs ``model``'s graph on its inputs, calling each nested model that holds taps as its own tap model."""
    inner: dict[int, tuple] = {}
    top: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        if len(path) > 1:
            inner.setdefault(id(path[0]), (path[0], []))[1].append(i)
        else:
            top.setdefault(id(path[0]), []).append(i)
    for key, (sub, idx) in list(inner.items()):
        if len(_nodes_in(model, sub)) != 1:
            raise UserError(f"model '{sub.name}' is called {len(_nodes_in(model, sub))} times in model "
                            f"'{model.name}'; a tap inside it needs it called once")
        inner[key] = (sub, idx, tap_model(sub, [names[i] for i in idx]))

    features = [None] * len(names)
    values = {str(id(x)): _Reusable(x) for x in model.inputs}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(t not in values for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(values)
            layer = node.layer
            if id(layer) in inner:
                sub, idx, tapped = inner[id(layer)]
                results = tf.nest.flatten(tapped(*args, **kwargs))
                n = len(sub.outputs)
                outputs = results[:n]
                for i, t in zip(idx, results[n:]):
                    features[i] = t
            else:
                outputs = tf.nest.flatten(layer(*args, **kwargs))
            if id(layer) in top:
                if len(_nodes_in(model, layer)) != 1 or len(outputs) != 1:
                    _node_output(model, layer, names[top[id(layer)][0]])  # raises the matching UserError
                for i in top[id(layer)]:
                    features[i] = outputs[0]
            for x_id, y in zip(node.flat_output_ids, outputs):
                values[x_id] = _Reusable(y)
    outputs = [values[str(id(x))].value for x in model.outputs]
    return keras.Model(model.inputs, [*outputs, *features], name=f"{model.name}_taps")
