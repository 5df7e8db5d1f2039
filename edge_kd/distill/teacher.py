"""Teachers as users bring them: a saved file, a softmax or logits head, another input size or range.

``adapt_teacher`` turns any of those into a frozen Functional model that takes the *student's*
input (same tensor the student sees) and returns logits, so the Distiller never has to care.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_kd import builtin_teachers
from edge_kd.errors import UserError, first_line
from edge_kd.keras import keras, tf

layers = keras.layers


def load_teacher(path, trust: bool = False) -> keras.Model:
    """Returns the Keras model saved at ``path`` (.keras or .h5, or ``builtin:<name>``), loaded with safe mode
    unless ``trust``, as a tf_keras model: a file Keras 3 wrote is rebuilt by ``edge_kd.keras3``. Every error is
    one line of at most ``keras3.MAX_ERROR`` characters."""
    from edge_kd import keras3

    path = Path(builtin_teachers.resolve(str(path)))
    if not path.is_file():
        raise UserError(f"teacher file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise UserError(f"teacher must be a .keras or .h5 file, got '{path.name}'")
    if suffix != ".keras" and not trust:
        # Keras' safe_mode only guards the .keras format; an .h5 Lambda layer would run marshalled code.
        lambdas = _h5_lambda_layers(path)
        if lambdas:
            raise UserError(keras3.short(f"teacher {path.name} holds Lambda layer(s) {', '.join(lambdas)} whose code "
                                         "would run on loading; pass --trust-teacher if you trust its source"))
    model = keras3.load_model(path, trust, "teacher", trust_option="--trust-teacher")
    if not isinstance(model, keras.Model):
        raise UserError(f"teacher {path.name} is not a Keras model")
    return model


def _h5_lambda_layers(path) -> list[str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as e:
        raise UserError(f"cannot read teacher {Path(path).name}: not a valid HDF5 file ({first_line(e)})") from None
    if raw is None:
        return []
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                found.append(str(node.get("config", {}).get("name", "?")))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(raw))
    return found


def check_finite(teacher: keras.Model, sample) -> None:
    """Raises a UserError unless ``teacher``'s outputs on ``sample`` are all finite numbers."""
    out = np.asarray(teacher(sample, training=False))
    if not np.all(np.isfinite(out)):
        bad = int(np.sum(~np.all(np.isfinite(out.reshape(len(out), -1)), axis=1)))
        raise UserError(f"teacher gives outputs that are not finite (NaN or infinity) on {bad} of {len(out)} training "
                        f"images, so its weights are broken; re-export it from a model that predicts well")


def _is_softmax(fn) -> bool:
    return fn is keras.activations.softmax or getattr(fn, "__name__", "") == "softmax"


def logits_model(model: keras.Model, sample=None) -> tuple[keras.Model, str]:
    """Returns ``(model_giving_logits, head)`` where head is "logits", "softmax" or "probabilities".

    A softmax head is cut off structurally (exact logits). Where the graph cannot be cut but the
    outputs are probabilities on ``sample``, log-probabilities stand in: softmax(log p / T) equals
    the tempered teacher distribution exactly, so the Hinton loss is unchanged.
    """
    last = model.layers[-1] if model.layers else None
    if last is not None and getattr(model, "_is_graph_network", False):
        if isinstance(last, layers.Softmax) or (isinstance(last, layers.Activation) and _is_softmax(last.activation)):
            return keras.Model(model.inputs, last.input, name=f"{model.name}_logits"), "softmax"
        if _is_softmax(getattr(last, "activation", None)):
            cfg = last.get_config()
            cfg["activation"] = "linear"
            cfg["name"] = f"{last.name}_logits"
            twin = type(last).from_config(cfg)
            out = twin(last.input)
            twin.set_weights(last.get_weights())
            return keras.Model(model.inputs, out, name=f"{model.name}_logits"), "softmax"
    if sample is not None:
        p = np.asarray(model(sample, training=False))
        if p.ndim == 2 and p.min() >= 0.0 and p.max() <= 1.0 and np.allclose(p.sum(-1), 1.0, atol=1e-3):
            # A subclassed model has no input_shape; the sample shows what it takes.
            inp = keras.Input(model.input_shape[1:] if model.inputs else np.shape(sample)[1:])
            out = LogProbabilities()(model(inp, training=False))
            return keras.Model(inp, out, name=f"{model.name}_logprob"), "probabilities"
    return model, "logits"


class LogProbabilities(layers.Layer):
    """log(p), floored at the smallest normal float32 so a saturated probability stays finite."""

    def call(self, p):
        return tf.math.log(tf.maximum(p, np.finfo(np.float32).tiny))


def adapt_teacher(model: keras.Model, input_shape: Sequence[int], num_classes: int,
                  data_scale: float, data_offset: float,
                  teacher_scale: float | None = None, teacher_offset: float | None = None,
                  sample=None, flip_average: bool = False) -> tuple[keras.Model, dict]:
    """Returns ``(frozen teacher taking the student's input and giving logits, description dict)``.

    ``data_scale``/``data_offset`` map raw pixels to the student's input, ``teacher_scale``/
    ``teacher_offset`` to the teacher's (default: the same). The teacher side resizes bilinearly to
    the teacher's own height and width. With ``flip_average`` the logits are the mean of the teacher's
    logits for the image and for its left-right mirror (one teacher, run on both). A teacher whose logits
    on ``sample`` (student inputs, when given) are not all finite (broken weights) is a UserError.
    """
    if model.inputs is None or model.outputs is None:
        raise UserError(f"teacher must be a Functional or Sequential Keras model with a known input, got "
                        f"{type(model).__name__}; wrap it: keras.Model(inp, teacher(inp))")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"teacher must have one input and one output, it has {len(model.inputs)} and {len(model.outputs)}")
    t_shape = tuple(model.input_shape[1:])
    if len(t_shape) != 3:
        raise UserError(f"teacher must take images (H, W, C), it takes {t_shape}")
    h, w, c = input_shape
    if t_shape[-1] != c:
        raise UserError(f"teacher takes {t_shape[-1]} channel(s) but the data has {c}")
    out_classes = model.output_shape[-1]
    if out_classes != num_classes:
        raise UserError(f"teacher predicts {out_classes} classes but the data has {num_classes}")
    teacher_scale = data_scale if teacher_scale is None else teacher_scale
    teacher_offset = data_offset if teacher_offset is None else teacher_offset
    student_sample = sample
    if sample is not None:
        sample = tf.image.resize(sample, t_shape[:2]) if t_shape[:2] != (h, w) and None not in t_shape[:2] else sample
        sample = (np.asarray(sample) - data_offset) / data_scale * teacher_scale + teacher_offset
    logits, head = logits_model(model, sample)
    logits.trainable = False

    inp = keras.Input(tuple(input_shape), name="image")
    x = inp
    # raw = (x - data_offset) / data_scale; teacher input = raw * teacher_scale + teacher_offset
    a = teacher_scale / data_scale
    b = teacher_offset - data_offset * a
    if not (np.isclose(a, 1.0) and np.isclose(b, 0.0)):
        x = layers.Rescaling(a, b, name="teacher_normalise")(x)
    th, tw = t_shape[:2]
    if th is not None and tw is not None and (th, tw) != (h, w):
        x = layers.Resizing(th, tw, interpolation="bilinear", name="teacher_resize")(x)
    out = logits(x, training=False)
    if flip_average:
        mirrored = logits(Mirror(name="teacher_mirror")(x), training=False)
        out = layers.Average(name="teacher_flip_average")([out, mirrored])
    adapted = keras.Model(inp, out, name="teacher")
    adapted.trainable = False
    if student_sample is not None:
        check_finite(adapted, student_sample)
    info = {"head": head, "input_shape": list(t_shape), "scale": float(teacher_scale), "offset": float(teacher_offset),
            "resized": (th, tw) != (h, w), **({"flip_average": True} if flip_average else {})}
    return adapted, info


class Mirror(layers.Layer):
    """The image batch (N, H, W, C) mirrored left to right."""

    def call(self, x):
        return tf.reverse(x, axis=[2])
