"""The Keras 3 border: the one place that imports Keras 3 (``import keras`` since TensorFlow 2.16).

edge-kd trains in tf_keras (``edge_kd.keras``), because tensorflow-model-optimization needs it. A model from
Keras 3 (a file it wrote, or an object from Python) comes in through here: it is rebuilt as an equivalent tf_keras
Functional model (each layer by the same class and settings, the same graph, its weights copied) and the rebuilt
model's outputs are checked against the original's before it is used. Which Keras wrote a file is read from the
file itself. Keras 3 is imported only when such a model or file appears.

Elementwise arithmetic in the graph (``x + 3.0``, ``x * y``: a ``keras.ops`` operation in Keras 3, a ``TFOpLambda``
layer in tf_keras) crosses both ways, as do Keras 3's ``hard_sigmoid`` and ``hard_silu`` activation layers (built from
tf_keras layers that compute the same function), so keras.applications' MobileNetV3 crosses too.

What cannot be rebuilt, said in one line: a subclassed model (no graph to read), a layer with no counterpart (a
custom layer, another ``keras.ops`` call or tf op inside the graph), and a layer setting the other Keras lacks (e.g.
a LoRA rank).
"""
from __future__ import annotations

import inspect
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from edge_kd.errors import UserError, first_line

#: the largest difference allowed between a Keras 3 model's outputs and its tf_keras rebuild's (on outputs of
#: magnitude up to 1; relative above that)
TOLERANCE = 1e-5
#: the longest message a model-loading error may have
MAX_ERROR = 300

# Keras 3 activations by the tf_keras name of the same function; those whose tf_keras namesake computes something
# else (hard_sigmoid: slope 1/6 in Keras 3, 0.2 in tf_keras) or that tf_keras lacks are refused by name, except as
# an Activation layer of _HARD_ACTIVATIONS
_ACTIVATIONS = {"silu": "swish"}
# Keras 3 activation layers rebuilt from tf_keras layers: relu6(x + 3) / 6, and x times it
_HARD_ACTIVATIONS = {"hard_sigmoid": False, "hard_silu": True, "hard_swish": True}  # -> times x
# elementwise arithmetic by its keras.ops / tf.math name: Keras 3 records it as a keras.ops operation (by class
# name), tf_keras as a TFOpLambda layer (by tf symbol)
_KERAS3_OPS = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply", "Divide": "divide",
               "TrueDivide": "divide"}
_TF_SYMBOLS = {"__operators__.add": "add", "math.add": "add", "math.subtract": "subtract",
               "math.multiply": "multiply", "math.truediv": "divide", "math.divide": "divide"}
# ... and what each becomes: (the tf.math function, the keras.ops.numpy operation class)
_ARITHMETIC = {"add": ("add", "Add"), "subtract": ("subtract", "Subtract"), "multiply": ("multiply", "Multiply"),
               "divide": ("truediv", "TrueDivide")}
_TF_KERAS_ACTIVATIONS = {"elu", "exponential", "gelu", "linear", "mish", "relu", "selu", "sigmoid", "softmax",
                         "softplus", "softsign", "swish", "tanh"}

# settings every tf_keras layer takes through its base class
_BASE_KEYS = {"name", "dtype", "trainable", "dynamic", "input_shape", "batch_input_shape", "batch_size", "weights",
              "activity_regularizer", "autocast", "input_dim"}


def _keras3():
    import keras

    if not keras.__version__.startswith("3."):  # pragma: no cover - requirements.txt pins Keras 3
        raise RuntimeError(f"expected Keras 3 from `import keras`, found {keras.__version__}")
    return keras


def short(text: str) -> str:
    """Returns ``text`` on one line, cut to ``MAX_ERROR`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 3] + "..."


def writer(path) -> str | None:
    """Returns the version of Keras that wrote the model file at ``path`` ("3.15.1", "2.21.0"), as the file says
    (a .keras archive's metadata.json, an .h5's ``keras_version`` attribute); None when it does not say."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return str(json.loads(z.read("metadata.json")).get("keras_version")) or None
        import h5py

        with h5py.File(path, "r") as f:
            v = f.attrs.get("keras_version")
            return (v.decode() if isinstance(v, bytes) else str(v)) if v is not None else None
    except Exception:  # unreadable: the loader's own error says what is wrong
        return None


def is_keras3_model(obj) -> bool:
    """Returns whether ``obj`` is a Keras 3 model (without importing Keras 3 when nothing imported it)."""
    k3 = sys.modules.get("keras")
    return k3 is not None and getattr(k3, "__version__", "").startswith("3.") and isinstance(obj, k3.Model)


def load_model(path, trust: bool, what: str, trust_option: str | None = None):
    """Returns the model saved at ``path`` (.keras or .h5) as a tf_keras model: loaded by the Keras that wrote it
    (read from the file) in safe mode unless ``trust``, a Keras 3 model then rebuilt (``to_tf_keras``).

    Its errors are one line naming ``what`` (e.g. "teacher"), the file and the Keras that wrote it; a model that
    needs unsafe deserialization says to pass ``trust_option`` where there is one."""
    path = Path(path)
    version = writer(path)
    written = f" (written by Keras {version})" if version else ""
    from_keras3 = (version or "").startswith("3.")
    load = _keras3().saving.load_model if from_keras3 else _tf_keras().models.load_model
    try:
        model = load(path, compile=False, safe_mode=not trust)
    except Exception as e:  # a corrupt zip/h5 surfaces as many different exception types
        if trust_option and ("unsafe" in str(e).lower() or "lambda" in str(e).lower()):
            raise UserError(short(f"{what} {path.name}{written} needs unsafe deserialization (a Lambda layer with "
                                  f"code); pass {trust_option} if you trust its source")) from None
        raise UserError(short(f"cannot load {what} {path.name}{written}: {first_line(e)}")) from None
    return to_tf_keras(model, f"{what} {path.name}") if from_keras3 else model


def to_tf_keras(model, where: str, sample=None):
    """Returns ``model`` (a Keras 3 Functional or Sequential model) rebuilt as a tf_keras Functional model with its
    weights, checked to give the same outputs (within ``TOLERANCE``) on ``sample`` (inputs the model takes;
    default: 4 seeded random images in [0, 1]). Anything that cannot be rebuilt is a one-line UserError starting
    with ``where`` (e.g. "teacher t.keras")."""
    return _checked(model, _rebuild(model, where, from_keras3=True), where, "its tf_keras rebuild", sample)


def to_keras3(model, where: str, sample=None):
    """Returns tf_keras Functional or Sequential ``model`` rebuilt as a Keras 3 Functional model with its weights,
    checked as ``to_tf_keras`` checks; what Keras 3 lacks is a one-line UserError starting with ``where``."""
    return _checked(model, _rebuild(model, where, from_keras3=False), where, "its Keras 3 copy", sample)


def save_keras3(model, path, where: str, sample=None) -> None:
    """Writes tf_keras ``model`` to ``path`` as a Keras 3 ``.keras`` file (``to_keras3``), atomically."""
    from edge_kd.fileio import atomic_path

    twin = to_keras3(model, where, sample)
    with atomic_path(Path(path)) as tmp:
        twin.save(tmp)


def _checked(model, rebuilt, where: str, what: str, sample):
    """Returns ``rebuilt`` when its outputs on ``sample`` equal ``model``'s within ``TOLERANCE``."""
    if sample is None:
        shape = [d if d is not None else 32 for d in model.inputs[0].shape[1:]]
        sample = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    theirs = np.asarray(model(sample, training=False), np.float32)
    ours = np.asarray(rebuilt(sample, training=False), np.float32)
    scale = max(1.0, float(np.max(np.abs(theirs)))) if theirs.size else 1.0
    worst = float(np.max(np.abs(theirs - ours))) if theirs.size and theirs.shape == ours.shape else float("inf")
    if not worst <= TOLERANCE * scale:
        raise UserError(short(f"{where}: {what} gives other outputs than the model (largest difference "
                              f"{worst:.2g}); report the model's layers to edge-kd"))
    return rebuilt


def _graph(model, where: str, k3: bool):
    """Returns the graph of ``model`` (Keras 3 when ``k3``, else tf_keras) as (name, [(input tensor, its layer's
    name)], [(layer, args, kwargs, output tensors)] in an order that computes every input before its use, output
    tensors)."""
    from edge_kd.keras import tf

    lib = _keras3() if k3 else _tf_keras()
    graph = model
    if k3 and isinstance(model, lib.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise UserError(short(f"{where}: a Keras 3 Sequential model without a known input shape; build it with "
                                  "keras.Input(shape) as its first layer"))
    if not hasattr(graph, "_nodes_by_depth") or not graph.inputs:
        raise UserError(short(f"{where}: a subclassed model ({type(model).__name__}) has no graph to rebuild; "
                              "give a Functional or Sequential model"))
    inputs = [(t, (t._keras_history.operation if k3 else t._keras_history.layer).name) for t in graph.inputs]
    steps = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.is_input:
                continue
            if k3:
                steps.append((node.operation, list(node.arguments.args), dict(node.arguments.kwargs),
                              list(node.outputs)))
            else:
                steps.append((node.layer, list(node.call_args), dict(node.call_kwargs), tf.nest.flatten(node.outputs)))
    return model.name, inputs, steps, list(graph.outputs)


def _tf_keras():
    from edge_kd.keras import keras

    return keras


def _rebuild(model, where: str, from_keras3: bool):
    """Returns the Functional twin of ``model`` in the other Keras, weights copied (outputs not checked)."""
    from edge_kd.keras import tf

    src, dst = (_keras3(), _tf_keras()) if from_keras3 else (_tf_keras(), _keras3())
    tensor = src.KerasTensor if from_keras3 else type(model.inputs[0])
    name, inputs, steps, outputs = _graph(model, where, from_keras3)
    memo, new_inputs = {}, []
    for t, layer_name in inputs:
        x = dst.Input(shape=tuple(t.shape[1:]), dtype=str(getattr(t.dtype, "name", t.dtype)), name=layer_name)
        memo[id(t)] = x
        new_inputs.append(x)

    def mapped(v):
        if isinstance(v, tensor):
            return memo[id(v)]
        if isinstance(v, (list, tuple)):
            return type(v)(mapped(u) for u in v)
        if isinstance(v, dict):
            return {k: mapped(u) for k, u in v.items()}
        return v

    made = {}  # id(layer) -> (layer, its twin): a shared layer is shared again
    for op, args, kwargs, outs in steps:
        if id(op) not in made:
            made[id(op)] = (op, _twin(op, where, src, dst, from_keras3))
        result = made[id(op)][1](*mapped(args), **mapped(kwargs))
        for old, new in zip(outs, tf.nest.flatten(result)):
            memo[id(old)] = new
    new_outputs = [memo[id(t)] for t in outputs]
    rebuilt = dst.Model(new_inputs if len(new_inputs) > 1 else new_inputs[0],
                        new_outputs if len(new_outputs) > 1 else new_outputs[0], name=name)
    for op, twin in made.values():
        if isinstance(op, src.Model) or not isinstance(twin, dst.layers.Layer):
            continue  # rebuilt with its weights; or arithmetic, a hard activation: no weights
        arrays = [np.asarray(w) for w in op.get_weights()]
        shapes = [tuple(w.shape) for w in twin.weights]
        if [a.shape for a in arrays] != shapes:
            raise UserError(short(f"{where}: layer '{op.name}' ({type(op).__name__}) holds weights of shapes "
                                  f"{[a.shape for a in arrays]}, its rebuild {shapes}"))
        twin.set_weights(arrays)
    return rebuilt


def _twin(op, where: str, src, dst, from_keras3: bool):
    """Returns the layer of Keras ``dst`` equivalent to layer ``op`` of Keras ``src`` (a nested model rebuilt
    whole)."""
    if isinstance(op, src.Model):
        return _rebuild(op, where, from_keras3)
    kind = type(op).__name__
    arithmetic = _KERAS3_OPS.get(kind) if from_keras3 else _TF_SYMBOLS.get(getattr(op, "symbol", None))
    if arithmetic and (not from_keras3 or type(op).__module__.startswith("keras.src.ops")):
        return _arithmetic(arithmetic, op.name, from_keras3)
    if not isinstance(op, src.layers.Layer) or kind == "TFOpLambda":
        call = f"a keras.ops call ({kind})" if from_keras3 else f"tf.{getattr(op, 'symbol', kind)}"
        raise UserError(short(f"{where}: operation '{op.name}' ({call} in the graph) has no "
                              f"{'tf_keras' if from_keras3 else 'Keras 3'} counterpart; edge-kd carries add, subtract, "
                              "multiply and divide; write the rest as keras.layers layers"))
    cls = getattr(dst.layers, kind, None)
    builtin = type(op).__module__.startswith("keras." if from_keras3 else "tf_keras.")
    if cls is None or not builtin:
        other = "tf_keras" if from_keras3 else "Keras 3"
        raise UserError(short(f"{where}: layer '{op.name}' ({kind}) has no {other} counterpart; edge-kd rebuilds "
                              "models made of the built-in keras.layers"))
    activation = op.get_config().get("activation") if kind == "Activation" and from_keras3 else None
    if activation == "relu6":
        return dst.layers.ReLU(max_value=6.0, name=op.name)
    if activation in _HARD_ACTIVATIONS:
        return _hard_activation(dst.layers, op.name, times_x=_HARD_ACTIVATIONS[activation])
    config = _config(op, cls, where, from_keras3)
    try:
        return cls.from_config(config)
    except Exception as e:
        first = first_line(e).split(" using config=")[0]  # Keras appends the whole config
        raise UserError(short(f"{where}: layer '{op.name}' ({kind}) cannot be rebuilt: {first}")) from None


def _arithmetic(name: str, op_name: str, from_keras3: bool):
    """Returns the other Keras' elementwise ``name`` ("add", ...) as one named operation: a TFOpLambda layer in
    tf_keras, a keras.ops operation in Keras 3 (whose ``keras.ops.add`` takes no name, so its class is used)."""
    if from_keras3:
        from edge_kd.keras import keras, tf

        layer = keras.src.layers.core.tf_op_layer.TFOpLambda(getattr(tf.math, _ARITHMETIC[name][0]), name=op_name)
    else:
        from keras.src.ops import numpy as k3_numpy

        layer = getattr(k3_numpy, _ARITHMETIC[name][1])(name=op_name.replace("/", "_"))

    def call(*args, **kwargs):
        # a loaded tf_keras model's node may hold the operands by the tf op's argument names, and its name argument
        operands = list(args) + [kwargs.pop(k) for k in ("x", "y") if k in kwargs]
        kwargs.pop("name", None)
        return layer(*operands, **kwargs)

    return call


def _hard_activation(layers, name: str, times_x: bool):
    """Returns Keras 3's hard_sigmoid (relu6(x + 3) / 6, computed as min(max(x / 6 + 0.5, 0), 1)) or, ``times_x``,
    its hard_silu (x times that) built from tf_keras ``layers``; the last layer keeps ``name``, so a feature term
    taps it as before."""
    scale = layers.Rescaling(1 / 6, offset=0.5, name=f"{name}_scale")
    gate = layers.ReLU(max_value=1.0, name=f"{name}_gate" if times_x else name)
    if not times_x:
        return lambda x: gate(scale(x))
    times = layers.Multiply(name=name)
    return lambda x: times([x, gate(scale(x))])


def _config(op, cls, where: str, from_keras3: bool) -> dict:
    """Returns layer ``op``'s settings as ``cls`` (its counterpart in the other Keras) takes them."""
    config = op.get_config()
    accepted = set(_BASE_KEYS) | set(_defaults(cls))
    defaults = _defaults(type(op))
    out = {}
    for key, value in config.items():
        if key.endswith("_initializer"):
            continue  # the weights are copied; the defaults stand in
        if key not in accepted:
            if value in (None, False, 0, "", [], {}) or (key in defaults and value == defaults[key]):
                continue  # a setting left at its default (synchronized, lora_rank, a depthwise layer's groups=1)
            raise UserError(short(f"{where}: layer '{op.name}' ({type(op).__name__}) sets {key}={value!r}, which "
                                  f"{'tf_keras' if from_keras3 else 'Keras 3'} lacks"))
        if key == "activation" and isinstance(value, str):
            value = _ACTIVATIONS.get(value, value) if from_keras3 else value
            if value not in _TF_KERAS_ACTIVATIONS:
                raise UserError(short(f"{where}: layer '{op.name}' ({type(op).__name__}) uses activation '{value}', "
                                      "which tf_keras lacks or computes otherwise; supported: "
                                      f"{', '.join(sorted(_TF_KERAS_ACTIVATIONS | set(_ACTIVATIONS)))}; relu6, "
                                      f"{', '.join(_HARD_ACTIVATIONS)} as an Activation layer"))
        out[key] = _value(key, value)
    if not from_keras3 and "/" in out.get("name", ""):
        out["name"] = out["name"].replace("/", "_")  # Keras 3 refuses '/' in names (tf_keras' MobileNetV3 has them)
    return out


def _defaults(cls) -> dict:
    """Returns the settings ``cls`` takes (through its base classes' ``__init__`` too) and their defaults."""
    found = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and name != "self":
                    found[name] = param.default
    return found


def _value(key, value):
    """A setting in the form the other Keras reads: a dtype policy by name, serialized objects without the module
    keys."""
    if key == "dtype" and isinstance(value, dict):
        return value.get("config", {}).get("name", "float32")
    if isinstance(value, (list, tuple)) and type(value) not in (list, tuple):  # tf's tracked ListWrapper
        value = list(value)
    if key == "axis" and isinstance(value, list) and len(value) == 1:
        return value[0]  # tf_keras' normalization layers keep [axis]; Keras 3's BatchNormalization takes an int
    if isinstance(value, dict) and "class_name" in value:
        return {"class_name": value["class_name"], "config": value.get("config", {})}
    return value
