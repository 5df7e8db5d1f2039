"""Running exported TFLite models with LiteRT: predictions, accuracy, latency, memory, and where it ran.

Inputs are always the float32, already-normalised tensors the Keras model takes; a model with
int8/uint8 input is fed them quantized with its own input scale and zero point, so every variant
is evaluated on exactly the same data.

Example::

    from edge_kd.bench.litert import accuracy, latency
    acc = accuracy("student-int8.tflite", x_test, y_test)
    lat = latency("student-int8.tflite", x_test[0], num_threads=1)   # lat["median_ms"], lat["q1_ms"], lat["q3_ms"]
    both = latency_rounds({"a": "a.tflite", "b": "b.tflite"}, x_test[0], [1, 2])   # interleaved: a b a b ...
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edge_kd import interrupt


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
    if len(np.asarray(y)) != len(x):
        raise ValueError(f"{len(x)} inputs but {len(np.asarray(y))} labels")
    if len(x) == 0:
        raise ValueError("accuracy needs at least one sample")
    return top1(TFLiteModel(path, num_threads=num_threads).predict(x, batch_size=batch_size), y)


def top1(outputs, y) -> float:
    """Returns the share (0..1) of rows of ``outputs`` whose arg-max is the label (``y``: ints or one-hot)."""
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    y = y.reshape(-1)
    if len(y) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(y)} labels")
    return float(np.mean(np.asarray(outputs).reshape(len(y), -1).argmax(axis=1) == y))


def latency(path, sample, num_threads: int, rounds: int = 10, round_seconds: float = 0.1,
            warmup_seconds: float = 0.5, min_runs_per_round: int = 5) -> dict:
    """Returns batch-1 latency statistics in ms of the one model at ``path`` (``latency_rounds`` of one model)."""
    return latency_rounds({"m": path}, sample, [num_threads], rounds=rounds, round_seconds=round_seconds,
                          warmup_seconds=warmup_seconds, min_runs_per_round=min_runs_per_round)["m"][str(num_threads)]


def latency_rounds(paths: dict, sample, threads, rounds: int = 10, round_seconds: float = 0.1,
                   warmup_seconds: float = 0.5, min_runs_per_round: int = 5, clock=time.perf_counter,
                   runner=None) -> dict:
    """Returns {name: {threads: stats}}: batch-1 latency of every model, measured in interleaved rounds.

    Every (model, thread count) gets its own interpreter, built and warmed up (for ``warmup_seconds``)
    first. Then ``rounds`` times, each model in turn (A B C … A B C …) runs back-to-back ``invoke()``
    calls for ``round_seconds`` (and at least ``min_runs_per_round``); the round's figure is the
    median of its calls. A slow spell of the machine thus lands on every model alike instead of on
    whichever was measured then. Stats per model (``edge_kd.bench.results.LATENCY_FIELDS`` and
    ``threads``): ``median_ms`` over rounds, ``q1_ms``/``q3_ms``
    (its IQR), ``min_ms``/``max_ms`` of the round figures, ``rounds``, ``runs`` (all timed calls),
    ``init_ms`` (interpreter creation and allocation) and ``first_ms`` (the first invoke).

    ``runner(path, threads)`` (tests) returns a zero-argument invoke; it defaults to a LiteRT interpreter.
    """
    if rounds < 1 or min_runs_per_round < 1:
        raise ValueError(f"rounds and min_runs_per_round must be >= 1; got {rounds}, {min_runs_per_round}")
    runner = runner or (lambda path, t: _invoker(path, sample, t, clock))
    order, invoke, stats = [], {}, {}
    for name, path in paths.items():
        for t in threads:
            start = clock()
            fn = runner(path, int(t))
            init = clock() - start
            start = clock()
            fn()
            first = clock() - start
            order.append((name, str(t)))
            invoke[order[-1]] = fn
            stats[order[-1]] = {"threads": int(t), "init_ms": init * 1e3, "first_ms": first * 1e3}
    for key in order:  # warm-up, each model in turn
        start = clock()
        while clock() - start < warmup_seconds:
            invoke[key]()
    per_round = {key: [] for key in order}
    runs = dict.fromkeys(order, 0)
    for _ in range(rounds):
        interrupt.check()
        for key in order:
            fn, times, spent = invoke[key], [], 0.0
            while len(times) < min_runs_per_round or spent < round_seconds:
                t0 = clock()
                fn()
                dt = clock() - t0
                times.append(dt)
                spent += dt
            per_round[key].append(float(np.median(times)) * 1e3)
            runs[key] += len(times)
    out: dict = {}
    for key in order:
        ms = np.asarray(per_round[key])
        q1, med, q3 = np.percentile(ms, [25, 50, 75])
        out.setdefault(key[0], {})[key[1]] = {
            **stats[key], "median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "rounds": int(rounds), "runs": runs[key]}
    return out


def _invoker(path, sample, num_threads: int, clock):
    """Returns a zero-argument callable that sets ``sample`` (batch 1) and invokes the model's interpreter."""
    sample = np.asarray(sample, dtype=np.float32)
    interpreter = _interpreter(path, num_threads)
    detail = interpreter.get_input_details()[0]
    if tuple(int(d) for d in detail["shape"][1:]) != sample.shape:
        raise ValueError(f"latency takes one sample of shape {tuple(int(d) for d in detail['shape'][1:])} "
                         f"(no batch axis); got {sample.shape}")
    if detail["shape"][0] != 1:
        interpreter.resize_tensor_input(detail["index"], [1, *sample.shape])
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    data, index = quantize_input(sample[None, ...], detail), detail["index"]
    interpreter.set_tensor(index, data)  # the input stays in place: every timed call computes the same image
    return interpreter.invoke


MEMORY_METHOD = ("peak resident memory (VmHWM) of a fresh process, reset after importing LiteRT, across creating "
                 "the interpreter, allocating its tensors and one invoke at batch 1 with {threads} thread(s): "
                 "the model file, the tensor arena, the kernels' scratch buffers and the delegate's packed weights")


def peak_memory(path, num_threads: int = 1) -> dict:
    """Returns ``{"peak_bytes", "method"}``: the growth of a fresh process's peak RSS from loading and running the model.

    Linux only (it reads /proc/self/status and resets the peak with /proc/self/clear_refs); elsewhere
    ``peak_bytes`` is None.
    """
    import json
    import subprocess
    import sys

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TFLite model at {path}")
    method = MEMORY_METHOD.format(threads=num_threads)
    if not Path("/proc/self/clear_refs").exists():
        return {"peak_bytes": None, "method": method + " (not available on this system)"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(int(num_threads))],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe of {path.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got.get("hwm_kb") is None:
        return {"peak_bytes": None, "method": method + " (this kernel does not reset the peak)"}
    return {"peak_bytes": int(max(0, got["hwm_kb"] - got["before_kb"]) * 1024), "method": method}


_MEMORY_PROBE = r"""
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])

before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    reset = status("VmHWM") <= before + 64
except OSError:
    reset = False
it = Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[2]))
d = it.get_input_details()[0]
if d["shape"][0] != 1:
    it.resize_tensor_input(d["index"], [1, *d["shape"][1:]])
it.allocate_tensors()
d = it.get_input_details()[0]
it.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
it.invoke()
print(json.dumps({"before_kb": before, "hwm_kb": status("VmHWM") if reset else None}))
"""


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
