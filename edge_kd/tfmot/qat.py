"""Quantization-aware training (QAT) with tensorflow-model-optimization's 8-bit schemes, trained in the Distiller.

``quantize`` applies tfmot's default 8-bit scheme, its sparsity-preserving variant (PQAT: pruned
zeros stay zero while the weights train) or its cluster-preserving one (PCQAT: clusters and zeros
kept). Layers the scheme cannot quantize train in float (``unsupported="float"``, the default: the int8
converter then quantizes them from the representative data; ``float_note`` says which), or are named in a
UserError with ``unsupported="error"``.
Wrapped layers are named ``quant_<name>`` and keep their original name inside the wrapper.

Example (runnable; a real run fine-tunes a pruned student while distilling)::

    import numpy as np
    import models
    from edge_kd.tfmot import qat
    from edge_kd.distill import Distiller
    from edge_kd.export.tflite import convert

    student = models.build("cnn", (28, 28, 1), 10)
    q = qat.quantize(student, qat.QATConfig(preserve_sparsity=True))
    d = Distiller(q)
    d.compile(optimizer="adam")
    x, y = np.random.rand(64, 28, 28, 1).astype("float32"), np.random.randint(0, 10, 64)
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    int8_flatbuffer = convert(q, "int8", representative=x[:32], int8_io=True)
    q.save("qat.keras")
    again = qat.load("qat.keras")          # or qat.load(path, base=student, cfg=...) to keep PQAT/PCQAT quantizers

tfmot serialises neither a layer's weight quantizer nor the values its PQAT/PCQAT quantizers derive
from the kernel, so ``load(path)`` gives the model back with default 8-bit weight quantizers (exact for
evaluation and export; further training would not preserve zeros or clusters) and cannot rebuild a
PCQAT model at all. ``load(path, base=..., cfg=...)`` rebuilds ``quantize(base, cfg)`` and loads the
saved weights into it, which keeps every quantizer and works for PCQAT too.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
from pathlib import Path

from edge_kd.tfmot import common
from edge_kd.tfmot.config import QATConfig
from edge_kd.errors import UserError, first_line
from edge_kd.keras import keras

import tensorflow_model_optimization as tfmot  # noqa: E402  (after edge_kd.keras: resolves to tf_keras)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_registry import (  # noqa: E402,E501
    Default8BitQuantizeRegistry)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.quantize_wrapper import QuantizeWrapperV2  # noqa: E402

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def scheme(cfg: QATConfig):
    """Returns the tfmot QuantizeScheme ``cfg`` selects: PCQAT, PQAT or the default 8-bit scheme."""
    if cfg.preserve_clusters:
        return tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
            preserve_sparsity=cfg.preserve_sparsity)
    if cfg.preserve_sparsity:
        return tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    return tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()


def scheme_name(cfg: QATConfig) -> str:
    """Returns a few words naming the scheme ``cfg`` selects."""
    if cfg.preserve_clusters:
        return "cluster- and sparsity-preserving 8-bit" if cfg.preserve_sparsity else "cluster-preserving 8-bit"
    return "sparsity-preserving 8-bit" if cfg.preserve_sparsity else "default 8-bit"


def unsupported_layers(model, cfg: QATConfig | None = None) -> list[tuple[str, str]]:
    """Returns ``[(layer name, layer class)]`` of the layers the scheme of ``cfg`` cannot quantize.

    Decided as ``quantize_apply`` decides: after the scheme's layout transforms (which take care of,
    for example, a BatchNormalization that follows a convolution), a layer needs a quantize config from
    them or support in both the scheme's registry and the default 8-bit registry.
    """
    cfg = cfg or QATConfig()
    common.require_graph_model(model, "quantization-aware training")
    common.refuse_wrapped(model, "quantization-aware training")
    _refuse_nested(model)
    return [(layer.name, type(layer).__name__) for layer in _unsupported(model, cfg)]


def check(model, cfg: QATConfig) -> list[str]:
    """Returns the layers ``quantize`` would leave in float, raising the UserError it would raise."""
    common.require_graph_model(model, "quantization-aware training")
    common.refuse_wrapped(model, "quantization-aware training")
    _refuse_nested(model)
    bad = _unsupported(model, cfg)
    # edge-kd's own input scaling and resizing (models.OWN_INPUT_LAYERS) stay in float whatever the setting: the
    # user did not add them, and the int8 converter calibrates them from the representative images
    refused = [layer for layer in bad if not _own_preprocessing(layer)]
    if refused and cfg.unsupported == "error":
        if len(refused) <= 3:
            what = ("layers " if len(refused) > 1 else "layer ") + ", ".join(
                f"{layer.name} ({type(layer).__name__})" for layer in refused)
        else:
            what = f"{len(refused)} layers ({_kinds(refused)}: {_first_names(refused)})"
        raise UserError(f"{what} cannot be quantized by tfmot's {scheme_name(cfg)} scheme; "
                        f"set qat.unsupported: float to leave them in float")
    floats = {layer.name for layer in bad}
    if all(layer.name in floats for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)):
        raise UserError(f"no layer of model {model.name!r} can be quantized by tfmot's {scheme_name(cfg)} scheme")
    return sorted(floats)


def float_note(model, floats, cfg: QATConfig) -> str | None:
    """Returns a line naming what of ``model`` QAT leaves in float (``check``'s list), or None when that is only
    edge-kd's own input scaling (which the user did not add, so there is nothing to tell)."""
    floats = set(floats)
    layers = [layer for layer in model.layers if layer.name in floats]
    shown = [layer for layer in layers if not _own_preprocessing(layer)]
    if not shown:
        return None
    return (f"{len(layers)} of {len(model.layers) - len(model._input_layers)} layers train without fake "
            f"quantization, which tfmot's {scheme_name(cfg)} scheme cannot give them ({_kinds(layers)}: "
            f"{_first_names(shown)}); the int8 converter quantizes them from the representative images "
            f"(qat.unsupported: error refuses such a model instead)")


def _kinds(layers) -> str:
    """Returns the classes of ``layers``, most frequent first, with their counts: "TFOpLambda ×38, Multiply ×19"."""
    counts = collections.Counter(type(layer).__name__ for layer in layers)
    return ", ".join(f"{cls} ×{n}" if n > 1 else cls for cls, n in counts.most_common())


def _first_names(layers, shown: int = 3) -> str:
    return ", ".join(layer.name for layer in layers[:shown]) + (", ..." if len(layers) > shown else "")


def quantize(model, cfg: QATConfig | None = None) -> keras.Model:
    """Returns a quantization-aware copy of ``model``; ``.qat_float_layers`` names the layers left in float."""
    cfg = cfg or QATConfig()
    floats = set(check(model, cfg))
    copy = common.clone_with(model)
    objects = common.custom_objects(copy)
    with keras.utils.custom_object_scope(objects):
        annotated = keras.models.clone_model(
            copy, clone_function=lambda layer: layer if layer.name in floats
            else tfmot.quantization.keras.quantize_annotate_layer(layer))
    try:
        with tfmot.quantization.keras.quantize_scope(objects):
            quantized = tfmot.quantization.keras.quantize_apply(annotated, _StrictScheme(scheme(cfg)))
    except (ValueError, RuntimeError) as e:
        # What the layer-type check cannot foresee, e.g. a Dense with an activation tfmot has no quantizer for.
        raise UserError(f"tfmot's {scheme_name(cfg)} scheme cannot quantize model {model.name!r}: "
                        f"{first_line(e)}") from None
    quantized.qat_float_layers = tuple(sorted(floats))
    return quantized


@contextlib.contextmanager
def scope(custom_objects: dict | None = None):
    """Returns a context in which QAT models save and load: tfmot's quantize_scope plus edge-kd's loading fixes."""
    with tfmot.quantization.keras.quantize_scope(dict(custom_objects or {})), \
            keras.utils.custom_object_scope(_LOADING_FIXES):
        yield


def load(path, base=None, cfg: QATConfig | None = None, custom_objects: dict | None = None,
         safe_mode: bool = True) -> keras.Model:
    """Returns the QAT model saved at ``path`` (.keras or .h5), or ``quantize(base, cfg)`` with its weights loaded."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"QAT model file not found: {path}")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise UserError(f"QAT model must be a .keras or .h5 file, got '{path.name}'")
    if base is not None:
        model = quantize(base, cfg)
        try:
            model.load_weights(str(path))
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"cannot load {path.name} into the quantization of {base.name!r}: {first_line(e)}; "
                            "the file must come from quantize() of the same model with the same QATConfig") from None
        return model
    try:
        with scope(custom_objects):
            return keras.models.load_model(path, compile=False, safe_mode=safe_mode)
    except ValueError as e:
        text = first_line(e)
        if "variables" in text or "weight" in text.lower():
            raise UserError(f"cannot load {path.name}: {text}; tfmot 0.8.1 cannot rebuild a cluster-preserving "
                            "QAT model from its file (its quantizer makes its variables from the kernel values), "
                            "load it with qat.load(path, base=<the clustered model>, cfg=...)") from None
        raise UserError(f"cannot load {path.name}: {text}") from None
    except Exception as e:  # a corrupt zip/h5 surfaces as many different exception types
        raise UserError(f"cannot load {path.name}: {first_line(e)}") from None


def _refuse_nested(model) -> None:
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:
        raise UserError(f"quantization-aware training needs a flat model (tfmot quantizes no model inside a "
                        f"model); {model.name!r} nests {', '.join(nested)}")


def _own_preprocessing(layer) -> bool:
    """Returns whether ``layer`` is the input scaling or resizing the models registry puts in front of a backbone."""
    from models import OWN_INPUT_LAYERS

    return OWN_INPUT_LAYERS.get(layer.name) == type(layer).__name__


#: ``_unsupported``'s answers by architecture and setting: a run checks its student before training (its
#: preflight) and again when it quantizes, and a search checks each candidate; the answer depends on the layers
#: and how they connect, never on the weights, and finding it clones the model (0.1-0.3 s for a small CNN)
_UNSUPPORTED: collections.OrderedDict = collections.OrderedDict()


def _unsupported(model, cfg: QATConfig) -> list:
    """Returns the layers of ``model`` left unquantizable once every other layer is annotated."""
    try:
        key = hashlib.sha256(f"{model.to_json()}\0{cfg.model_dump_json()}".encode()).hexdigest()
    except Exception:  # noqa: BLE001  (a layer without a config: no key, found anew each time)
        key = None
    names = _UNSUPPORTED.get(key)
    if names is None:
        names = {layer.name for layer in _find_unsupported(model, cfg)}
        if key is not None:
            _UNSUPPORTED[key] = names
            if len(_UNSUPPORTED) > 64:
                _UNSUPPORTED.popitem(last=False)  # the oldest
    return [layer for layer in model.layers if layer.name in names]


def _find_unsupported(model, cfg: QATConfig) -> list:
    """``_unsupported``, found by annotating every layer and asking the scheme's layout transform and registry."""
    quantize_scheme = scheme(cfg)
    candidates = {layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}
    bad: dict[str, object] = {}
    with tfmot.quantization.keras.quantize_scope(common.custom_objects(model)):
        # Leaving a layer in float can change which transforms match, so repeat until nothing new fails.
        while True:
            found = [layer for layer in _check(model, candidates - set(bad), quantize_scheme) if layer.name not in bad]
            if not found:
                break
            bad.update((layer.name, model.get_layer(layer.name)) for layer in found)
    return [layer for layer in model.layers if layer.name in bad]


def _check(model, annotated: set[str], quantize_scheme) -> list:
    layer_quantize_map = {name: {"quantize_config": None} for name in annotated}
    # As quantize_apply does: an input feeding an annotated layer is quantized too.
    for input_layer in model._input_layers:
        for node in input_layer._outbound_nodes:
            if node.outbound_layer.name in layer_quantize_map:
                layer_quantize_map[input_layer.name] = {}
    transformed, layer_quantize_map = quantize_scheme.get_layout_transformer().apply(model, layer_quantize_map)
    registry, default = quantize_scheme.get_quantize_registry(), Default8BitQuantizeRegistry()
    found = []
    for layer in transformed.layers:
        if layer.name not in annotated or isinstance(layer, (keras.layers.InputLayer, QuantizeLayer)):
            continue
        if layer_quantize_map.get(layer.name, {}).get("quantize_config") is not None:
            continue
        # The sparsity/cluster-preserving registries accept any weightless layer, then ask the default one.
        if not (default.supports(layer) and registry.supports(layer)):
            found.append(layer)
    return found


class _StrictRegistry:
    """A scheme's registry that supports a layer only where the default 8-bit registry does too.

    The sparsity/cluster-preserving registries claim every weightless layer, then ask the default registry
    for its config, which raises for a layer it does not know. quantize_apply asks exactly that of a float
    layer feeding a quantized one, so without this, ``unsupported="float"`` would fail under PQAT/PCQAT.
    """

    def __init__(self, registry):
        self._registry, self._default = registry, Default8BitQuantizeRegistry()

    def supports(self, layer):
        return self._default.supports(layer) and self._registry.supports(layer)

    def get_quantize_config(self, layer):
        return self._registry.get_quantize_config(layer)


class _StrictScheme(tfmot.quantization.keras.QuantizeScheme):
    """``scheme`` with its registry made strict (see _StrictRegistry)."""

    def __init__(self, scheme):
        self._scheme = scheme

    def get_layout_transformer(self):
        return self._scheme.get_layout_transformer()

    def get_quantize_registry(self):
        return _StrictRegistry(self._scheme.get_quantize_registry())


class _LoadableQuantizeLayer(QuantizeLayer):
    """tfmot's QuantizeLayer whose build runs once.

    The .keras loader builds a layer from its saved shape and then calls it; tfmot's build does not mark
    the layer built, so it would run again and make a second set of range variables.
    """

    def build(self, input_shape):
        if self.built:
            return
        super().build(input_shape)
        keras.layers.Layer.build(self, input_shape)


class _LoadableQuantizeWrapperV2(QuantizeWrapperV2):
    """tfmot's QuantizeWrapperV2 that builds its layer first, as quantize_apply's wrappers find theirs.

    Around a built layer the wrapper lists the quantized kernel twice among its variables (once from the
    layer, once its own), and the .keras file stores both; around an unbuilt one it lists it once.
    """

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
            keras.layers.Layer.build(self.layer, input_shape)
        super().build(input_shape)


# The .keras format names a layer's variables after its class name, so the fixes keep tfmot's names.
for _cls, _name in ((_LoadableQuantizeLayer, "QuantizeLayer"), (_LoadableQuantizeWrapperV2, "QuantizeWrapperV2")):
    _cls.__name__ = _cls.__qualname__ = _name
_LOADING_FIXES = {"QuantizeLayer": _LoadableQuantizeLayer, "QuantizeWrapperV2": _LoadableQuantizeWrapperV2}
