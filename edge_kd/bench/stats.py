"""What a model costs besides time: bytes on disk, parameters, multiply-accumulates, weight sparsity.

Example::

    from edge_kd.bench.stats import count_macs, count_params, file_sizes, tflite_weight_sparsity
    size, gz = file_sizes("student-int8.tflite")
    sparsity = tflite_weight_sparsity("student-int8.tflite")["overall"]
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from edge_kd.errors import UserError

KB = 1024  # bytes in the KB that file sizes are reported in (the report, the search's size limit)

# Ops whose inputs[1] is the weight tensor (TRANSPOSE_CONV's inputs are output_shape, weights, input).
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_3D", "TRANSPOSE_CONV")


def keras_accuracy(model, x, y, batch_size: int = 512) -> float:
    """Returns the top-1 accuracy (0..1) of Keras ``model`` on inputs ``x`` and integer labels ``y``."""
    return float(np.mean(np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1) == y))


def machine() -> str:
    """Returns the machine a benchmark record was measured on: its processor's model name (as Linux names it; else
    what ``platform`` knows) and the cores this process may use."""
    import os
    import platform

    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
             if ln.startswith("model name")] if info.is_file() else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{names[0] if names else platform.processor() or platform.machine()}, {cores} cores"


#: the benchmarks' results files, which a running benchmark rewrites after each seed: not code that measures
RESULTS_DIR = "benchmarks/results"


def code_version(root=None) -> str | None:
    """Returns the git commit a benchmark row was measured with (``+changes`` where tracked files other than the
    results in ``RESULTS_DIR`` differed from it), or None outside a git checkout: rows kept from an earlier session
    then still say which code made them."""
    import subprocess

    root = Path(root or Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", f":(exclude){RESULTS_DIR}"],
                               cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def mean_std(values) -> tuple[float, float]:
    """Returns the mean and the sample standard deviation (ddof=1; 0 for a single value) of ``values``."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def file_sizes(path) -> tuple[int, int]:
    """Returns (size in bytes, size in bytes after gzip level 9) of the file at ``path``."""
    data = Path(path).read_bytes()
    return len(data), len(gzip.compress(data, compresslevel=9))


def count_params(model) -> int:
    """Returns the number of scalars in all weights (trainable and not) of a tf_keras model."""
    seen, total = set(), 0
    for w in model.weights:
        if id(w) in seen:
            continue
        seen.add(id(w))
        total += int(np.prod(w.shape))
    return total


def count_macs(model) -> int:
    """Returns the multiply-accumulates of one batch-1 forward pass of a Sequential/Functional tf_keras model."""
    return _graph_macs(model)


def _graph_macs(model) -> int:
    if not getattr(model, "_is_graph_network", False):
        raise UserError(f"count_macs needs a Sequential or Functional model with known input shape; "
                        f"{type(model).__name__} {model.name!r} is subclassed or not built")
    total = 0
    # Every call of a layer is a node, so a layer shared by two branches is counted twice, as it runs twice.
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            total += _layer_macs(node.layer, node.input_shapes, node.output_shapes)
    return total


def _layer_macs(layer, input_shapes, output_shapes) -> int:
    from edge_kd.keras import keras

    layers = keras.layers
    if isinstance(layer, keras.Model):
        return _graph_macs(layer)
    if isinstance(layer, layers.Wrapper):
        # Pruning/QAT wrappers and TimeDistributed: the costs below count every output position, so
        # the inner layer's cost follows from the wrapper's own shapes.
        return _layer_macs(layer.layer, input_shapes, output_shapes)

    transpose = tuple(getattr(layers, n) for n in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
                      if hasattr(layers, n))
    depthwise = tuple(getattr(layers, n) for n in ("DepthwiseConv1D", "DepthwiseConv2D") if hasattr(layers, n))
    separable = tuple(getattr(layers, n) for n in ("SeparableConv1D", "SeparableConv2D") if hasattr(layers, n))

    if isinstance(layer, transpose):
        # Each input element is scattered through kernel_size × filters weights.
        kernel = _shape(layer.kernel)  # (*k, filters, in_channels)
        return _positions(input_shapes, layer) * int(np.prod(kernel[:-2])) * kernel[-2]
    if isinstance(layer, depthwise):
        return _positions(output_shapes, layer) * int(np.prod(_shape(layer.depthwise_kernel)[:-2]))
    if isinstance(layer, separable):
        dw = _shape(layer.depthwise_kernel)  # (*k, in_channels, multiplier)
        outputs = _positions(output_shapes, layer)
        spatial = outputs // layer.filters
        return spatial * int(np.prod(dw)) + outputs * dw[-2] * dw[-1]
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        # kernel is (*k, in_channels / groups, filters): each output element costs prod(kernel[:-1]).
        return _positions(output_shapes, layer) * int(np.prod(_shape(layer.kernel)[:-1]))
    if isinstance(layer, layers.Dense):
        return _positions(output_shapes, layer) * _shape(layer.kernel)[0]
    return 0


def _shape(variable) -> tuple[int, ...]:
    return tuple(int(d) for d in variable.shape)


def _positions(shapes, layer) -> int:
    """Number of elements of a node's single tensor at batch 1."""
    if isinstance(shapes, list):
        if len(shapes) != 1:
            raise UserError(f"count_macs: layer {layer.name!r} has {len(shapes)} tensors where one was expected")
        shapes = shapes[0]
    dims = tuple(shapes)[1:]
    if any(d is None for d in dims):
        raise UserError(f"count_macs needs fixed input sizes; layer {layer.name!r} has shape {tuple(shapes)}")
    return int(math.prod(dims))


def tflite_weight_sparsity(path) -> dict:
    """Returns the fraction of exact zeros in each conv/dense weight tensor of a TFLite model, and overall."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without delegates the op list is the model's own, not one opaque XNNPACK node.
    interpreter = Interpreter(model_path=str(path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops = interpreter._get_ops_details()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    produced_by = {int(o): op for op in ops for o in op["outputs"]}
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}

    layers, total_zeros, total_size = {}, 0, 0
    seen = set()
    for op in ops:
        if op["op_name"] not in _WEIGHT_OPS or len(op["inputs"]) < 2:
            continue
        index = int(op["inputs"][1])
        # fp16 models store the kernel as a float16 constant behind a DEQUANTIZE op.
        while index in produced_by and produced_by[index]["op_name"] == "DEQUANTIZE":
            index = int(produced_by[index]["inputs"][0])
        if index < 0 or index in produced_by or index in graph_inputs or index in seen:
            continue
        seen.add(index)
        detail = details[index]
        values = interpreter.get_tensor(index)
        zeros = _count_zeros(values, detail)
        name = detail["name"]
        if name in layers:
            name = f"{name}#{index}"
        layers[name] = {"zeros": zeros, "size": int(values.size), "sparsity": zeros / values.size if values.size else 0.0}
        total_zeros += zeros
        total_size += int(values.size)
    return {"layers": layers, "overall": total_zeros / total_size if total_size else 0.0}


def _count_zeros(values: np.ndarray, detail: dict) -> int:
    if not np.issubdtype(values.dtype, np.integer):
        return int(np.count_nonzero(values == 0))
    q = detail.get("quantization_parameters") or {}
    zero_points = np.asarray(q.get("zero_points", []), dtype=np.int64)
    if zero_points.size <= 1:
        zp = int(zero_points[0]) if zero_points.size else 0
        return int(np.count_nonzero(values.astype(np.int64) == zp))
    # Per-channel quantization: broadcast the zero points along the quantized dimension.
    axis = int(q.get("quantized_dimension", 0))
    shape = [1] * values.ndim
    shape[axis] = zero_points.size
    return int(np.count_nonzero(values.astype(np.int64) == zero_points.reshape(shape)))


def layer_of(tensor_name: str) -> str:
    """Returns the Keras layer a TFLite weight tensor belongs to ("cnn/quant_logits/MatMul;..." -> "logits")."""
    parts = tensor_name.split(";")[0].split("/")
    layer = parts[1] if len(parts) > 2 else parts[0]
    for prefix in ("quant_", "prune_low_magnitude_", "cluster_"):
        layer = layer[len(prefix):] if layer.startswith(prefix) else layer
    return layer
