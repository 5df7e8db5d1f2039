"""Architectures by name: ``build(name, input_shape, num_classes, **kw)`` returns a Functional tf_keras model.

Every model ends in a logits Dense layer (no softmax), takes float inputs normalised as the data
bundle says, and converts to TFLite with builtin ops only.

>>> import models
>>> m = models.build("cnn", (28, 28, 1), 10, width=0.5)
>>> m.output_shape
(None, 10)
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

from edge_kd.errors import UserError, first_line
from edge_kd.keras import keras

layers = keras.layers
_REGISTRY: dict[str, Callable[..., keras.Model]] = {}


def register(name: str):
    """Returns a decorator that registers an architecture function under ``name``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Returns the registered architecture names, sorted."""
    return sorted(_REGISTRY)


def options_of(name: str) -> list[str]:
    """Returns the keyword options architecture ``name`` takes."""
    return [p for p in inspect.signature(_REGISTRY[name]).parameters if p not in ("input_shape", "num_classes")]


def check_options(name: str, options: dict, where: str | None = None) -> None:
    """Raises a UserError unless ``name`` is registered and takes every option in ``options``.

    ``where`` names the recipe section the two came from (``student``: ``student.arch``, ``student.options``).
    """
    if name not in _REGISTRY:
        what = f"{where}.arch '{name}' is unknown" if where else f"unknown model '{name}'"
        raise UserError(f"{what}; available: {', '.join(available())}")
    unknown = sorted(set(options) - set(options_of(name)))
    if unknown:
        raise UserError(f"{where + '.options: ' if where else ''}model '{name}' has no option {', '.join(unknown)}; "
                        f"allowed: {', '.join(options_of(name))}")


def build(name: str, input_shape: Sequence[int], num_classes: int, **kw) -> keras.Model:
    """Returns a new, untrained Functional model ``name`` for inputs of ``input_shape`` and ``num_classes`` logits."""
    check_options(name, kw)
    try:
        return _REGISTRY[name](tuple(int(d) for d in input_shape), int(num_classes), **kw)
    except (TypeError, ValueError) as e:  # an option of the wrong kind, or an input the architecture cannot take
        raise UserError(f"model '{name}' cannot be built for input {tuple(input_shape)} with options {kw}: "
                        f"{first_line(e)}") from None


def _filters(n: int, width: float) -> int:
    # Multiples of 4 keep XNNPACK's int8 kernels on their fast paths.
    return max(4, int(round(n * width / 4.0)) * 4)


def _conv_bn_relu(x, filters, kernel=3, strides=1, name=None, weight_decay=0.0, use_bias=False):
    reg = keras.regularizers.l2(weight_decay) if weight_decay else None
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=use_bias,
                      kernel_regularizer=reg, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@register("mlp")
def mlp(input_shape, num_classes, hidden: Sequence[int] = (256, 128), dropout: float = 0.0):
    """Multi-layer perceptron over the flattened image."""
    inp = keras.Input(input_shape, name="image")
    x = layers.Flatten(name="flatten")(inp)
    for i, units in enumerate(hidden):
        x = layers.Dense(int(units), activation="relu", name=f"fc{i + 1}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"drop{i + 1}")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="mlp")


@register("cnn")
def cnn(input_shape, num_classes, width: float = 1.0, filters: Sequence[int] = (12, 24), head: str = "flatten"):
    """Small CNN: per stage a 3×3 conv-BN-ReLU then a 2×2 max-pool; a flatten (or global-average-pool) logits head."""
    if head not in ("flatten", "gap"):
        raise UserError(f"cnn head must be flatten or gap, got {head!r}")
    inp = keras.Input(input_shape, name="image")
    x = inp
    for i, f in enumerate(filters):
        x = _conv_bn_relu(x, _filters(f, width), name=f"block{i + 1}")
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x) if head == "flatten" else layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="cnn")


@register("cnn_large")
def cnn_large(input_shape, num_classes, width: float = 1.0, dropout: float = 0.4):
    """The default teacher: 3×3 conv 32 and 64 (each BN-ReLU, 2×2 max-pool), dense 256 with dropout."""
    inp = keras.Input(input_shape, name="image")
    x = inp
    for i, f in enumerate((32, 64)):
        x = _conv_bn_relu(x, _filters(f, width), name=f"block{i + 1}")
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_filters(256, width), activation="relu", name="fc")(x)
    x = layers.Dropout(dropout, name="drop")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="cnn_large")


@register("resnet8")
def resnet8(input_shape, num_classes, width: float = 1.0, weight_decay: float = 1e-4):
    """ResNet-8 of MLPerf Tiny image classification: a 16-filter stem and three residual stacks (16, 32, 64).

    Convolutions keep their biases as in the MLPerf reference, so 32×32×3 inputs give its 78,666 parameters.
    """
    reg = keras.regularizers.l2(weight_decay) if weight_decay else None
    inp = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inp, _filters(16, width), name="stem", weight_decay=weight_decay, use_bias=True)
    for i, (f, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
        f = _filters(f, width)
        name = f"stack{i + 1}"
        y = _conv_bn_relu(x, f, strides=stride, name=f"{name}_a", weight_decay=weight_decay, use_bias=True)
        y = layers.Conv2D(f, 3, padding="same", kernel_regularizer=reg, name=f"{name}_b_conv")(y)
        y = layers.BatchNormalization(name=f"{name}_b_bn")(y)
        if stride != 1 or x.shape[-1] != f:
            x = layers.Conv2D(f, 1, strides=stride, padding="same", kernel_regularizer=reg, name=f"{name}_shortcut")(x)
        x = layers.Add(name=f"{name}_add")([x, y])
        x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inp, out, name="resnet8")


@register("fastcnn")
def fastcnn(input_shape, num_classes, widths: Sequence[int] = (64, 256, 256), stem: int = 32,
            weight_decay: float = 2.5e-4):
    """The built-in CIFAR-10 teacher's network: a 3×3 conv stem, then per width a block of 3×3 conv → 2×2
    max-pool → BN-ReLU → 3×3 conv-BN-ReLU, a global max-pool and a dense logits layer.

    The block layout is the one of Keller Jordan's airbench (2024), a net made to train fast on CIFAR-10; with
    the default widths it has 1.98 M parameters and about 150 M multiply-adds per 32×32 image.
    """
    reg = keras.regularizers.l2(weight_decay) if weight_decay else None
    inp = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inp, int(stem), name="stem", weight_decay=weight_decay)
    for i, f in enumerate(widths):
        name = f"block{i + 1}"
        x = layers.Conv2D(int(f), 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"{name}_a_conv")(x)
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = layers.BatchNormalization(name=f"{name}_a_bn")(x)
        x = layers.ReLU(name=f"{name}_a_relu")(x)
        x = _conv_bn_relu(x, int(f), name=f"{name}_b", weight_decay=weight_decay)
    x = layers.GlobalMaxPooling2D(name="gmp")(x)
    out = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inp, out, name="fastcnn")


@register("mobilenet")
def mobilenet(input_shape, num_classes, width: float = 1.0,
              blocks: Sequence[tuple[int, int]] = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))):
    """MobileNet-style CNN: a strided 3×3 stem then depthwise-separable blocks ``(filters, stride)``."""
    inp = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inp, _filters(16, width), strides=2 if min(input_shape[:2]) >= 32 else 1, name="stem")
    for i, (f, stride) in enumerate(blocks):
        name = f"ds{i + 1}"
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
        x = layers.BatchNormalization(name=f"{name}_dw_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
        x = layers.Conv2D(_filters(f, width), 1, use_bias=False, name=f"{name}_pw")(x)
        x = layers.BatchNormalization(name=f"{name}_pw_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_pw_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="mobilenet")


# -- keras.applications backbones ------------------------------------------------------------------------------
#: registry name -> (the keras.applications class, the (scale, offset) that maps the models' [0, 1] input to the
#: range the backbone was made for: [-1, 1] for the MobileNets and ResNet50V2, 0..255 for EfficientNetB0, which
#: normalises with its own ImageNet mean and variance inside)
APPLICATIONS = {
    "mobilenet_v2": ("MobileNetV2", (2.0, -1.0)),
    "mobilenet_v3_small": ("MobileNetV3Small", (2.0, -1.0)),
    "mobilenet_v3_large": ("MobileNetV3Large", (2.0, -1.0)),
    "efficientnet_b0": ("EfficientNetB0", (255.0, 0.0)),
    "resnet50_v2": ("ResNet50V2", (2.0, -1.0)),
}


#: the backbones keras.applications builds only from 32×32 up (the others take smaller inputs as they are);
#: ``_application`` scales a smaller input up to 32 on that side for these
NEEDS_32_PX = {"mobilenet_v3_small", "mobilenet_v3_large"}

#: name -> class of the layers ``_application`` puts in front of a backbone: edge-kd's own, not the user's
OWN_INPUT_LAYERS = {"preprocess": "Rescaling", "upscale": "Resizing"}


def _application(name, input_shape, num_classes, dropout, bn_momentum=None, **options):
    """Returns keras.applications ``name`` without its top, built untrained (nothing is downloaded) into one flat
    Functional model: the preprocessing it expects as a ``preprocess`` Rescaling layer (then, for a MobileNetV3 and
    an input under 32×32, an ``upscale`` bilinear Resizing to 32 on that side), the backbone's own layers
    under their keras.applications names (so taps and weight files find them), then global average pooling,
    dropout and a ``logits`` Dense layer.

    ``bn_momentum`` replaces the momentum of every BatchNormalization's moving statistics (None: the backbone's
    own, 0.999 in the MobileNets, made for ImageNet's 5,000 steps an epoch: trained from scratch on a few
    thousand images, their inference statistics lag the weights by about 1,000 steps)."""
    cls_name, (scale, offset) = APPLICATIONS[name]
    inp = keras.Input(input_shape, name="image")
    x = layers.Rescaling(scale, offset, name="preprocess")(inp)
    h, w = input_shape[:2]
    if name in NEEDS_32_PX and min(h, w) < 32:  # 28×28 Fashion-MNIST, say
        x = layers.Resizing(max(h, 32), max(w, 32), name="upscale")(x)
    base = getattr(keras.applications, cls_name)(include_top=False, weights=None, input_tensor=x, **options)
    for layer in base.layers:
        if isinstance(layer, layers.Normalization) and layer.name.startswith("normalization"):
            # EfficientNet makes its Normalization unnamed, so its name counts the ones made before in the process
            # (normalization_3); a weights file, loaded by name, holds it as "normalization"
            layer._name = "normalization"
    if bn_momentum is not None:
        if not 0.0 <= float(bn_momentum) < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}")
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    x = layers.GlobalAveragePooling2D(name="gap")(base.output)
    if dropout:
        x = layers.Dropout(dropout, name="drop")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name=name)


@register("mobilenet_v2")
def mobilenet_v2(input_shape, num_classes, alpha: float = 1.0, dropout: float = 0.2, bn_momentum: float | None = None):
    """keras.applications MobileNetV2 (Sandler et al. 2018), width multiplier ``alpha``."""
    return _application("mobilenet_v2", input_shape, num_classes, dropout, bn_momentum, alpha=alpha)


@register("mobilenet_v3_small")
def mobilenet_v3_small(input_shape, num_classes, alpha: float = 1.0, minimalistic: bool = False,
                       dropout: float = 0.2, bn_momentum: float | None = None):
    """keras.applications MobileNetV3Small (Howard et al. 2019); ``minimalistic`` drops squeeze-excite and
    hard-swish."""
    return _application("mobilenet_v3_small", input_shape, num_classes, dropout, bn_momentum, alpha=alpha,
                        minimalistic=minimalistic, include_preprocessing=False)


@register("mobilenet_v3_large")
def mobilenet_v3_large(input_shape, num_classes, alpha: float = 1.0, minimalistic: bool = False,
                       dropout: float = 0.2, bn_momentum: float | None = None):
    """keras.applications MobileNetV3Large; ``minimalistic`` drops squeeze-excite and hard-swish."""
    return _application("mobilenet_v3_large", input_shape, num_classes, dropout, bn_momentum, alpha=alpha,
                        minimalistic=minimalistic, include_preprocessing=False)


@register("efficientnet_b0")
def efficientnet_b0(input_shape, num_classes, dropout: float = 0.2, bn_momentum: float | None = None):
    """keras.applications EfficientNetB0 (Tan and Le 2019)."""
    return _application("efficientnet_b0", input_shape, num_classes, dropout, bn_momentum)


@register("resnet50_v2")
def resnet50_v2(input_shape, num_classes, dropout: float = 0.0, bn_momentum: float | None = None):
    """keras.applications ResNet50V2 (He et al. 2016, pre-activation)."""
    return _application("resnet50_v2", input_shape, num_classes, dropout, bn_momentum)


def load_weights(model, path, where: str, skip: Sequence[str] = ()) -> None:
    """Loads a user's weights file (.h5 from tf_keras' ``save_weights`` or ``save``, or Keras 3's ``.weights.h5``)
    into ``model`` by layer name, so a backbone's file fills the backbone of a model with a new head; layers named
    in ``skip`` are left as they are. Every other layer with weights must be in the file, but for the head
    (``logits``), which a backbone's file lacks. A file that is missing, unreadable, of other layers or other
    shapes is a UserError naming ``where`` (``student.weights``)."""
    from pathlib import Path

    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: file not found: {path}")
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise UserError(f"{where}: expected a Keras weights file in HDF5 (.h5, from model.save_weights), got {path.name}")
    ours = {layer.name: layer for layer in model.layers if layer.weights and layer.name not in skip}
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in group.attrs and "layers" in group:  # Keras 3 (model.save_weights("x.weights.h5"))
                found = _keras3_weights(group)
                names = list(found)
                stored = {name: arrays for name, arrays in found.items() if name in ours}
            else:
                names = [_text(n) for n in group.attrs.get("layer_names", [])]
                stored = {}
                for name in names:
                    if name in ours:
                        g = group[name]
                        stored[name] = [g[_text(w)][()] for w in g.attrs.get("weight_names", [])]
    except (OSError, KeyError) as e:
        raise UserError(f"{where}: cannot read {path.name} as a Keras weights file: {e}") from None
    if not stored:
        raise UserError(f"{where}: {path.name} holds no weights of a layer of '{model.name}' (its layers: "
                        f"{', '.join(names[:4]) or 'none'}{' ...' if len(names) > 4 else ''}); is it for another "
                        f"architecture?")
    pairs = []
    for name, arrays in stored.items():
        variables = ours[name].trainable_weights + ours[name].non_trainable_weights  # the order the file keeps
        pairs += zip(variables, arrays)
        shapes = [tuple(v.shape) for v in variables]
        if [a.shape for a in arrays] != shapes:
            raise UserError(f"{where}: {path.name} does not match '{model.name}': layer {name!r} holds weights of "
                            f"shapes {[a.shape for a in arrays]}, the model's are {shapes}")
    missing = [n for n in ours if n not in stored and n != "logits"]  # a backbone's file has no head: that stays new
    if missing:
        raise UserError(f"{where}: {path.name} lacks {len(missing)} of the layers with weights of '{model.name}' "
                        f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); is it for another "
                        f"architecture or other options?")
    for v, a in pairs:
        v.assign(a)


def _keras3_weights(group) -> dict:
    """Returns {layer name: its arrays} of a Keras 3 weights file's ``layers`` group. Keras 3 files each layer under
    a path made from its class (``layers/dense``) and keeps its name in ``vars``' attributes; a nested model's layers
    are under its own ``layers`` group."""
    found = {}
    for g in group["layers"].values():
        v = g.get("vars")
        if v is not None and len(v):
            found[_text(v.attrs.get("name", g.name.rsplit("/", 1)[-1]))] = [v[str(i)][()] for i in range(len(v))]
        if "layers" in g:
            found.update(_keras3_weights(g))
    return found


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
