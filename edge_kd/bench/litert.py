"""Running exported TFLite models with LiteRT: predictions, accuracy, latency, and where it ran.

Inputs are always the float32, already-normalised tensors the Keras model takes; a model with
int8/uint8 input is fed them quantized with its own input scale and zero point, so every variant
is evaluated on exactly the same data.

Example::

    from edge_kd.bench.litert import accuracy, latency
    acc = accuracy("student-int8.tflite", x_test, y_test)
    lat = latency("student-int8.tflite", x_test[0], num_threads=1)   # lat["mean_ms"], lat["p90_ms"]
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class TFLiteModel:
    """A LiteRT interpreter around one single-input, single-output TFLite model.

    Example::

        model = TFLiteModel("student-int8.tflite", num_threads=2)
        probs_or_logits = model.predict(x)          # float32 (N, classes), int8 outputs dequantized
    """

    def __init__(self, path_or_bytes, num_threads: int = 1):
        self.interpreter = _interpreter(path_or_bytes, num_threads)
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"TFLiteModel handles one input and one output; this model has {len(inputs)} "
                             f"inputs and {len(outputs)} outputs")
        self.interpreter.allocate_tensors()
        self._batch = int(inputs[0]["shape"][0])

    @property
    def input_details(self) -> dict:
        """Returns the interpreter's details of the model's input tensor."""
        return self.interpreter.get_input_details()[0]

    @property
    def output_details(self) -> dict:
        """Returns the interpreter's details of the model's output tensor."""
        return self.interpreter.get_output_details()[0]

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Returns the model's float32 outputs for float32 normalised inputs ``x`` (N, H, W, C)."""
        x = np.asarray(x, dtype=np.float32)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        expected = tuple(int(d) for d in self.input_details["shape"][1:])
        if x.shape[1:] != expected:
            raise ValueError(f"input of shape {x.shape[1:]} per sample; the model takes {expected}")
        outs = []
        for start in range(0, len(x), batch_size):
            outs.append(self._run(x[start:start + batch_size]))
        if not outs:
            return np.zeros((0, *self.output_details["shape"][1:]), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:
            # Resizing re-plans the whole graph, so it happens only when the batch size changes.
            self.interpreter.resize_tensor_input(self.input_details["index"], [len(batch), *batch.shape[1:]])
            self.interpreter.allocate_tensors()
            self._batch = len(batch)
        self.interpreter.set_tensor(self.input_details["index"], quantize_input(batch, self.input_details))
        self.interpreter.invoke()
        out = self.output_details
        return dequantize_output(self.interpreter.get_tensor(out["index"]), out)


def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    """Returns float ``x`` cast to the tensor's dtype, quantized with its scale/zero point when integer."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return np.asarray(x, dtype=dtype)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        raise ValueError(f"integer input tensor {detail['name']!r} has no quantization scale")
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_output(y: np.ndarray, detail: dict) -> np.ndarray:
    """Returns output ``y`` as float32, dequantized with the tensor's scale/zero point when integer."""
    if not np.issubdtype(y.dtype, np.integer):
        return y.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        return y.astype(np.float32)
    return ((y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


def accuracy(path, x, y, batch_size: int = 256, num_threads: int = 1) -> float:
    """Returns the top-1 accuracy (0..1) of the TFLite model at ``path`` on inputs ``x`` and labels ``y``."""
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    y = y.reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if len(y) == 0:
        raise ValueError("accuracy needs at least one sample")
    pred = TFLiteModel(path, num_threads=num_threads).predict(x, batch_size=batch_size).reshape(len(y), -1).argmax(axis=1)
    return float(np.mean(pred == y))


def latency(path, sample, num_threads: int, min_warmup_runs: int = 1, min_warmup_seconds: float = 0.5,
            min_runs: int = 50, min_seconds: float = 1.0) -> dict:
    """Returns batch-1 latency statistics in ms of the model at ``path``, measured as benchmark_model does."""
    sample = np.asarray(sample, dtype=np.float32)
    t0 = time.perf_counter()
    interpreter = _interpreter(path, num_threads)
    detail = interpreter.get_input_details()[0]
    if tuple(int(d) for d in detail["shape"][1:]) != sample.shape:
        raise ValueError(f"latency takes one sample of shape {tuple(int(d) for d in detail['shape'][1:])} "
                         f"(no batch axis); got {sample.shape}")
    if detail["shape"][0] != 1:
        interpreter.resize_tensor_input(detail["index"], [1, *sample.shape])
    interpreter.allocate_tensors()
    init_s = time.perf_counter() - t0

    detail = interpreter.get_input_details()[0]
    data = quantize_input(sample[None, ...], detail)
    index = detail["index"]

    interpreter.set_tensor(index, data)
    t = time.perf_counter()
    interpreter.invoke()
    first_s = time.perf_counter() - t

    # Warm-up and timed runs both stop only when the count AND the time minimum are met, as in
    # benchmark_model; inputs are set before each run, outside the timed region.
    runs, start = 0, time.perf_counter()
    while runs < min_warmup_runs or time.perf_counter() - start < min_warmup_seconds:
        interpreter.set_tensor(index, data)
        interpreter.invoke()
        runs += 1

    times = []
    total = 0.0
    while len(times) < min_runs or total < min_seconds:
        interpreter.set_tensor(index, data)
        t = time.perf_counter()
        interpreter.invoke()
        dt = time.perf_counter() - t
        times.append(dt)
        total += dt

    ms = np.asarray(times) * 1e3
    return {
        "threads": int(num_threads),
        "init_ms": init_s * 1e3,
        "first_ms": first_s * 1e3,
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "runs": len(times),
    }


def runtime_info() -> dict:
    """Returns where benchmarks run: CPU model, core count, LiteRT/TensorFlow/Python versions, platform."""
    import ai_edge_litert

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "litert_version": getattr(ai_edge_litert, "__version__", None) or _dist_version("ai-edge-litert"),
        # Read from the installed metadata so that asking does not import TensorFlow.
        "tensorflow_version": _dist_version("tensorflow"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _interpreter(path_or_bytes, num_threads: int) -> Interpreter:
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1; got {num_threads}")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return Interpreter(model_content=bytes(path_or_bytes), num_threads=num_threads)
    path = Path(path_or_bytes)
    if not path.is_file():
        raise FileNotFoundError(f"no TFLite model at {path}")
    return Interpreter(model_path=str(path), num_threads=num_threads)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _dist_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
