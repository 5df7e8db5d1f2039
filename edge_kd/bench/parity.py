"""Does the .tflite compute what the Keras model computes, and which ops will run where?

``parity`` compares a Keras model's outputs with a ``.tflite`` file's under LiteRT on the same
normalised inputs. ``ops`` lists the TFLite ops a model uses and those the XNNPACK delegate (LiteRT's
default CPU delegate) leaves to LiteRT's own kernels.

How ``ops`` finds the fallbacks (ai-edge-litert 2.3.0): the Python interpreter exposes no execution
plan, but ``_get_ops_details()`` lists every node of subgraph 0. An interpreter created with
``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`` lists just the model's ops. A default one, after
``allocate_tensors()`` (where XNNPACK is applied), lists the same ops (the replaced nodes stay in the
node list, unmarked) followed by one ``DELEGATE`` node per partition XNNPACK took, whose inputs and
outputs are the partition's boundary tensors. Walking back from each ``DELEGATE`` node's outputs
through the original nodes' producers, stopping at its inputs, recovers the ops in that partition;
every op in no partition falls back to the built-in CPU kernels.

Example::

    from edge_kd.bench.parity import ops, parity
    parity(student, "student-int8.tflite", x_test)   # {"top1_agreement": 0.997, "max_abs_diff": 0.21, ...}
    ops("student-int8.tflite")   # {"ops": {"CONV_2D": 2, ...}, "xnnpack_fallback": {"SOFTMAX": 1}, ...}
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edge_kd.bench.litert import TFLiteModel

DELEGATE_OP = "DELEGATE"  # the node name LiteRT gives a delegate's kernel (XNNPACK's here)


def parity(keras_model, tflite_path, x=None, batch_size: int = 256, tflite_outputs=None, keras_outputs=None) -> dict:
    """Returns how closely the TFLite file's outputs follow the Keras model's on normalised inputs ``x``.

    Keys: ``n``, ``output_dtype``, ``max_abs_diff`` and ``mean_abs_diff`` (on dequantized outputs for
    an integer model), ``top1_agreement`` (fraction of samples with the same arg-max) and
    ``output_scale`` (the output quantization step, None for float outputs). ``tflite_outputs`` and
    ``keras_outputs``: the file's and the model's outputs on ``x``, where already computed (with
    both, ``x`` may be left out).
    """
    if x is None and (tflite_outputs is None or keras_outputs is None):
        raise ValueError("parity needs the inputs x unless both outputs are given")
    if x is not None:
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            raise ValueError("parity needs at least one sample")
    lite = TFLiteModel(tflite_path)
    detail = lite.output_details
    ref = np.asarray(keras_model.predict(x, batch_size=batch_size, verbose=0) if keras_outputs is None
                     else keras_outputs, dtype=np.float32)
    # integer outputs come back dequantized
    got = lite.predict(x, batch_size=batch_size) if tflite_outputs is None else np.asarray(tflite_outputs)
    if len(ref) == 0:
        raise ValueError("parity needs at least one sample")
    if ref.shape != got.shape:
        raise ValueError(f"Keras gives outputs of shape {ref.shape}, the TFLite model {got.shape}")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    integer = np.issubdtype(np.dtype(detail["dtype"]), np.integer)
    flat_ref, flat_got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    return {
        "n": int(len(ref)),
        "output_dtype": np.dtype(detail["dtype"]).name,
        "output_scale": float(detail["quantization"][0]) if integer else None,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(np.mean(flat_ref.argmax(1) == flat_got.argmax(1))),
    }


def ops(tflite_path) -> dict:
    """Returns the model's op names with counts and those XNNPACK does not take (run by LiteRT's own kernels).

    Keys: ``ops`` {name: count}, ``xnnpack_fallback`` {name: count}, ``xnnpack_partitions`` (the number
    of delegated partitions; 0 when XNNPACK took nothing, more than 1 when fallbacks split the graph).
    Only the main subgraph is inspected (the one Keras classifiers have).
    """
    path = str(Path(tflite_path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"no TFLite model at {path}")
    plain = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    names = [d["op_name"] for d in plain._get_ops_details()]

    delegated = Interpreter(model_path=path, num_threads=1)
    delegated.allocate_tensors()  # the default delegate is applied here, not at construction
    nodes = delegated._get_ops_details()
    original, added = nodes[:len(names)], nodes[len(names):]
    if [d["op_name"] for d in original] != names or any(d["op_name"] != DELEGATE_OP for d in added):
        raise RuntimeError(f"unexpected node list after delegation: {[d['op_name'] for d in nodes]} "
                           f"(without delegates: {names})")
    covered = _delegated_nodes(original, added)
    return {
        "ops": dict(sorted(Counter(names).items())),
        "xnnpack_fallback": dict(sorted(Counter(n for i, n in enumerate(names) if i not in covered).items())),
        "xnnpack_partitions": len(added),
    }


def _delegated_nodes(original: list[dict], delegate_nodes: list[dict]) -> set[int]:
    """Returns the indices of the original nodes that some delegate node replaced."""
    producer = {int(t): i for i, d in enumerate(original) for t in d["outputs"] if int(t) >= 0}
    covered: set[int] = set()
    for node in delegate_nodes:
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        seen: set[int] = set()
        while stack:
            t = stack.pop()
            if t in seen or t in boundary or t not in producer:
                continue  # a partition input, or a constant/model input nobody produces
            seen.add(t)
            i = producer[t]
            covered.add(i)
            stack.extend(int(u) for u in original[i]["inputs"] if int(u) >= 0)
    return covered
