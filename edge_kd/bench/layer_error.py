"""Where a quantized ``.tflite`` loses accuracy: each layer's output against the float model's, measured by running both.

Both files run under LiteRT on the same normalised inputs with every intermediate tensor kept
(``experimental_preserve_all_tensors``, LiteRT's built-in kernels without the XNNPACK delegate, so
each op's output is the tensor the kernel wrote). The TFLite converter names an op's output tensor
after the Keras layers fused into it (``cnn/block2_relu/Relu;cnn/block2_conv/Conv2D``), and it
keeps those names when it quantizes, so the float and quantized graphs are matched by tensor name.
Integer tensors are dequantized with their own scale and zero point before comparing.

For each matched op output ``f`` (float) and ``q`` (dequantized quantized):

- ``nrmse`` = ‖q − f‖ / ‖f‖ over the whole sample (0 = identical): the error that reached this layer
  (None where the float output is all zeros and the quantized one is not: no scale to relate it to);
- ``snr_db`` = −20·log10(nrmse) (None when the two are identical, or nrmse is None);
- ``cosine``: the mean over samples of the cosine similarity of the flattened outputs;
- ``added`` = nrmse minus the largest nrmse of the op's own inputs: the error this layer's own
  quantization adds. The worst layers are those with the largest ``added``.

Example::

    from edge_kd.bench.layer_error import layer_errors
    e = layer_errors("student-fp32.tflite", "student-int8.tflite", x_test[:256])
    e["worst"]          # ["block3_conv+block3_relu", ...]
    e["layers"][0]      # {"tensor": ..., "layer": ..., "op": "CONV_2D", "nrmse": 0.012, "added": 0.009, ...}
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edge_kd.bench.litert import dequantize_output, quantize_input
from edge_kd.bench.stats import layer_of

METHOD = ("LiteRT built-in kernels with every intermediate tensor kept; the float and the quantized file run on "
          "the same inputs, op outputs matched by tensor name, integer tensors dequantized; nrmse = ‖q−f‖/‖f‖ "
          "over the sample, added = nrmse minus that of the op's inputs (the error the layer itself adds)")
WORST = 3  # how many layers the report names


def op_outputs(model, x) -> tuple[list[dict], dict]:
    """Returns (ops in execution order with their input and output tensor names, {tensor name: float array})."""
    x = np.asarray(x, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # preserving all tensors is meant for debugging, which this is
        kwargs = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
        it = Interpreter(**kwargs, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], quantize_input(x, inp))
    it.invoke()
    details = {d["index"]: d for d in it.get_tensor_details()}
    values = {inp["name"]: x}  # the model's float input, as both models are fed it
    ops = []
    for op in it._get_ops_details():
        outs = [int(t) for t in op["outputs"] if int(t) >= 0]
        ins = [details[int(t)]["name"] for t in op["inputs"] if int(t) >= 0 and int(t) in details]
        for t in outs:
            d = details[t]
            if d["name"]:  # the converter leaves some helper tensors unnamed: nothing to match them by
                values[d["name"]] = _dequantize(it.get_tensor(t), d)
        ops.append({"op": op["op_name"], "inputs": ins, "outputs": [details[t]["name"] for t in outs],
                    "dtype": np.dtype(details[outs[0]]["dtype"]).name if outs else None})
    return ops, values


def compare(f: np.ndarray, q: np.ndarray) -> dict:
    """Returns nrmse, rmse, snr_db and mean per-sample cosine of ``q`` against reference ``f`` (N, ...)."""
    f = np.asarray(f, dtype=np.float64).reshape(len(f), -1)
    q = np.asarray(q, dtype=np.float64).reshape(len(q), -1)
    err = float(np.sum((q - f) ** 2))
    ref = float(np.sum(f ** 2))
    nrmse = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else None)  # None, not inf: JSON has no inf
    nf, nq = np.linalg.norm(f, axis=1), np.linalg.norm(q, axis=1)
    both = (nf > 0) & (nq > 0)
    cos = np.ones(len(f))
    cos[both] = np.sum(f[both] * q[both], axis=1) / (nf[both] * nq[both])
    cos[~both] = np.where(nf[~both] == nq[~both], 1.0, 0.0)  # both zero: same; one zero: orthogonal
    return {"rmse": math.sqrt(err / f.size), "nrmse": nrmse,
            "snr_db": None if err == 0 or nrmse is None else -20 * math.log10(nrmse), "cosine": float(cos.mean())}


def layer_errors(reference, quantized, x, worst: int = WORST) -> dict:
    """Returns each layer's error of ``quantized`` against ``reference`` (files or bytes) on inputs ``x``.

    Keys: ``method``, ``samples``, ``layers`` (execution order of the reference: tensor, layer, op,
    dtype in the quantized file, rmse, nrmse, snr_db, cosine, added) and ``worst`` / ``worst_tensors``
    (the layers with the largest ``added``, at most ``worst``, only those that add error).
    """
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("layer_errors needs at least one input sample")
    ref_ops, ref_values = op_outputs(reference, x)
    q_ops, q_values = op_outputs(quantized, x)
    q_dtype = {name: op["dtype"] for op in q_ops for name in op["outputs"]}
    # every activation both graphs hold, compared once; one with no float scale to relate its error to is left
    # out, and so is what is not one value per sample (the int32 shapes and scalars a graph computes, such as
    # EfficientNet's squeeze-excite reshapes)
    matched = {name: compare(ref_values[name], q_values[name]) for name in ref_values
               if name in q_values and ref_values[name].shape == q_values[name].shape
               and _per_sample(ref_values[name], len(x))}
    matched = {name: m for name, m in matched.items() if m["nrmse"] is not None}
    layers = []
    for op in ref_ops:
        for name in op["outputs"]:
            if name not in matched:
                continue  # the quantized graph has no tensor of that name (it fused or split the op differently)
            m = matched[name]
            upstream = [matched[i]["nrmse"] for i in op["inputs"] if i in matched]
            layers.append({"tensor": name, "layer": layer_name(name), "op": op["op"], "dtype": q_dtype.get(name),
                           **m, "added": m["nrmse"] - (max(upstream) if upstream else 0.0)})
    ranked = _ranked(layers)[:worst]
    return {"method": METHOD, "samples": int(len(x)), "layers": layers, "worst": [e["layer"] for e in ranked],
            "worst_tensors": [e["tensor"] for e in ranked]}


def _per_sample(values: np.ndarray, samples: int) -> bool:
    """Returns whether ``values`` is a float tensor with one entry per input sample along its first axis."""
    return np.issubdtype(values.dtype, np.floating) and values.ndim >= 1 and values.shape[0] == samples


def worst_tensors(errors: dict, n: int) -> list[str]:
    """Returns the output tensor names of the ``n`` layers that add the most error (for keeping them in float)."""
    return [e["tensor"] for e in _ranked(errors["layers"])[:n]]


def _ranked(layers: list[dict]) -> list[dict]:
    """Returns the layers that add error, the one adding the most first."""
    return sorted((e for e in layers if e["added"] > 0), key=lambda e: -e["added"])


def layer_name(tensor: str) -> str:
    """Returns the Keras layers fused into a TFLite op output ("cnn/b2_relu/Relu;cnn/b2_conv/Conv2D" -> "b2_conv+b2_relu")."""
    if tensor.startswith("StatefulPartitionedCall") or tensor.startswith("serving_default"):
        return "(model output)" if tensor.startswith("StatefulPartitionedCall") else "(model input)"
    names = list(dict.fromkeys(layer_of(part) for part in reversed(tensor.split(";"))))
    return "+".join(names)


def _dequantize(value: np.ndarray, detail: dict) -> np.ndarray:
    """Returns a tensor's value as float32, integer ones dequantized per tensor or per channel."""
    qp = detail.get("quantization_parameters") or {}
    scales, zeros = np.asarray(qp.get("scales", [])), np.asarray(qp.get("zero_points", []))
    if not np.issubdtype(value.dtype, np.integer) or scales.size <= 1:
        return dequantize_output(value, detail)  # float, per tensor, or an integer tensor without a scale
    shape = [1] * value.ndim  # per channel, along the quantized dimension
    shape[int(qp.get("quantized_dimension", 0))] = scales.size
    scales, zeros = scales.reshape(shape), zeros.reshape(shape)
    return ((value.astype(np.float32) - zeros.astype(np.float32)) * scales.astype(np.float32)).astype(np.float32)
