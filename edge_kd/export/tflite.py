"""Keras (tf_keras) model -> TFLite flatbuffer, in the variants edge-kd reports.

- ``fp32``; ``fp16`` (float16 weights);
- ``dynamic`` (int8 weights, float activations, per-channel dense weights: FULLY_CONNECTED v12,
  TFLite >= 2.17) and ``dynamic_compat`` (the same with per-tensor dense weights, which older
  runtimes load; conv weights stay per channel);
- ``int8`` (full integer); ``int8_mixed`` (full integer but the op outputs named in
  ``float_tensors`` computed in float, with QUANTIZE/DEQUANTIZE around them); ``int16x8`` (int16
  activations, int8 weights, float32 I/O).

Example::

    from edge_kd.export.tflite import convert
    from edge_kd.fileio import write_bytes

    write_bytes("student-int8.tflite", convert(student, "int8", representative=x_calib))

``representative`` holds already-normalised float32 model inputs (N, H, W, C); a few hundred
samples are plenty for calibration.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

import numpy as np

from edge_kd.keras import tf

from edge_kd.export.variants import CALIBRATED, INTEGER, VARIANTS  # noqa: F401  (what callers read here)


def convert(model, variant: str, representative=None, int8_io: bool = True, float_tensors=None,
            saved: str | None = None) -> bytes:
    """Returns the TFLite flatbuffer of ``model`` converted as ``variant`` (one of VARIANTS).

    ``float_tensors`` (``int8_mixed`` only): the op output tensor names, as the float TFLite file
    names them, whose ops stay in float. ``saved``: a folder ``saved_model(model)`` gave, so that
    several variants of one model are converted from one save (default: saved for this call).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if variant in CALIBRATED:
        if representative is None:
            raise ValueError(f"variant {variant!r} needs representative data (float32 N×H×W×C normalised inputs); "
                             f"variants that need none: {', '.join(v for v in VARIANTS if v not in CALIBRATED)}")
        representative = np.asarray(representative, dtype=np.float32)
        if representative.ndim < 2 or len(representative) == 0:
            raise ValueError(f"representative data must be a non-empty N×H×W×C array; got shape {representative.shape}")
    if variant == "int8_mixed" and not float_tensors:
        raise ValueError("variant 'int8_mixed' needs float_tensors: the op outputs to keep in float")

    with _quiet(), contextlib.ExitStack() as stack:
        if saved is None:
            saved = stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-kd-export-"))
            _save(model, saved)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serving_default"])
        return _convert(converter, variant, representative, int8_io, float_tensors)


@contextlib.contextmanager
def saved_model(model):
    """Yields a temporary folder holding ``model``'s inference function as a SavedModel, for ``convert(...,
    saved=folder)``: one save for all the variants of one model (a save costs about as much as a float
    conversion)."""
    with tempfile.TemporaryDirectory(prefix="edge-kd-export-") as folder:
        with _quiet():
            _save(model, folder)
        yield folder


def _save(model, folder: str) -> None:
    """Saves ``model``'s inference function in ``folder`` as a SavedModel of that one function and the model's
    variables (signature ``serving_default``: the Keras input's name in, the output layer's name out, a free batch
    dimension), which the converter reads.

    ``TFLiteConverter.from_keras_model`` converts the same graph, but first saves the whole Keras model, every
    layer's functions traced for serialization: 3x slower for a small CNN, 3x for EfficientNetB0 (34 s against
    11 s on 2 cores), for the same ops, tensor names and outputs.
    """
    if len(model.inputs or []) != 1 or len(model.outputs or []) != 1:
        raise ValueError(f"only models with one input and one output convert, {model.name} has "
                         f"{len(model.inputs or [])} and {len(model.outputs or [])}")
    inp, name_in, name_out = model.inputs[0], model.input_names[0], model.output_names[0]

    def serve(x):
        return {name_out: model(x, training=False)}

    fn = tf.function(serve, input_signature=[tf.TensorSpec([None, *inp.shape[1:]], inp.dtype, name=name_in)])
    holder = tf.Module()
    holder.model_variables = list(model.variables)  # what the function reads, saved with it
    tf.saved_model.save(holder, folder, signatures={"serving_default": fn.get_concrete_function()})


def _convert(converter, variant, representative, int8_io, float_tensors) -> bytes:
    """Returns what ``converter`` makes of its model as ``variant`` (``convert``'s arguments, checked)."""
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_compat":
        # Per-channel dense weights need FULLY_CONNECTED v12 (2.17); per-tensor ones load back to 2.4.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    elif variant == "int16x8":
        converter.representative_dataset = _representative_dataset(representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    elif variant in ("int8", "int8_mixed"):
        converter.representative_dataset = _representative_dataset(representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    if variant == "int8_mixed":
        return _selective(converter, list(float_tensors), int8_io)
    return bytes(converter.convert())


def _selective(converter, float_tensors: list[str], int8_io: bool) -> bytes:
    """Returns the full-integer model with the ops writing ``float_tensors`` left in float.

    TensorFlow's QuantizationDebugger calibrates once and re-quantizes with those ops denylisted
    (``get_nondebug_quantized_model``); the denylisted ops need the float builtins, hence TFLITE_BUILTINS.
    """
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=float_tensors, fully_quantize=int8_io)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=converter.representative_dataset, debug_options=options)
    return bytes(debugger.get_nondebug_quantized_model())


def _representative_dataset(samples: np.ndarray):
    def gen():
        # Batch 1, one sample at a time: the calibrator only needs the value ranges.
        for sample in samples:
            yield [sample[None, ...]]

    return gen


@contextlib.contextmanager
def _quiet():
    """Silences the converter's logging for the block; on failure, replays what it printed to stderr."""
    # The MLIR converter and the SavedModel export log from C++ straight to file descriptor 2, so only
    # redirecting the descriptor silences them; what they wrote is kept so an error can still be read.
    tf_logger = tf.get_logger()
    old_level = tf_logger.level
    absl_logger = logging.getLogger("absl")
    old_absl_level = absl_logger.level
    captured = tempfile.TemporaryFile(mode="w+b")
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved_fd = None
    try:
        saved_fd = os.dup(2)
        os.dup2(captured.fileno(), 2)
    except OSError:
        saved_fd = None
    tf_logger.setLevel(logging.ERROR)
    absl_logger.setLevel(logging.ERROR)
    ok = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]tatistics for quantized inputs.*")
            warnings.filterwarnings("ignore", message=".*trackable_obj.*")
            yield
        ok = True
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        tf_logger.setLevel(old_level)
        absl_logger.setLevel(old_absl_level)
        if not ok:
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            if text.strip():
                sys.stderr.write(text)
                sys.stderr.flush()
        captured.close()
