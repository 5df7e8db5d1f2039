"""LiteRT helpers checked against a bare interpreter run and NumPy maths."""
import os
import platform

import ai_edge_litert
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edge_kd.bench import litert
from edge_kd.bench.litert import TFLiteModel, accuracy, latency, runtime_info
from edge_kd.bench.results import LATENCY_FIELDS
from edge_kd.export.tflite import convert
from edge_kd.fileio import write_bytes
from edge_kd.keras import keras, tf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tf.keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.layers.Input((10, 10, 2)),
        keras.layers.Conv2D(6, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    x = np.random.default_rng(3).normal(size=(37, 10, 10, 2)).astype(np.float32)
    out = tmp_path_factory.mktemp("litert")
    fp32 = write_bytes(out / "m-fp32.tflite", convert(model, "fp32"))
    int8 = write_bytes(out / "m-int8.tflite", convert(model, "int8", representative=x))
    return model, x, fp32, int8


def _batch1_reference(path, x):
    """Independent reference: one sample at a time through a bare interpreter, quantized with NumPy here."""
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    ys = []
    for sample in x:
        s = sample[None]
        if inp["dtype"] == np.int8:
            scale, zp = inp["quantization"]
            s = np.clip(np.round(s / scale) + zp, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], s)
        it.invoke()
        y = it.get_tensor(out["index"])[0]
        if out["dtype"] == np.int8:
            scale, zp = out["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        ys.append(y)
    return np.stack(ys).astype(np.float32)


def test_predict_int8_io_partial_batch_matches_batch1_loop(models):
    _, x, _, int8 = models
    m = TFLiteModel(int8)
    assert m.input_details["dtype"] == np.int8 and m.output_details["dtype"] == np.int8
    resizes = []
    original = m.interpreter.resize_tensor_input
    m.interpreter.resize_tensor_input = lambda *a, **k: (resizes.append(a[1]), original(*a, **k))[1]
    y = m.predict(x, batch_size=16)  # 16 + 16 + a partial 5
    assert y.dtype == np.float32 and y.shape == (37, 4)
    ref = _batch1_reference(int8, x)
    scale = m.output_details["quantization"][0]
    assert np.max(np.abs(y - ref)) <= scale + 1e-7  # at most one quantization step apart; typically equal
    assert [list(r)[0] for r in resizes] == [16, 5]  # resized only when the batch size changed


def test_predict_fp32_matches_keras_and_batch1_loop(models):
    model, x, fp32, _ = models
    y = TFLiteModel(fp32.read_bytes(), num_threads=2).predict(x, batch_size=10)
    assert np.max(np.abs(y - model.predict(x, verbose=0))) <= 1e-4
    assert np.max(np.abs(y - _batch1_reference(fp32, x))) <= 1e-5


def test_quantize_input_rounds_and_clips():
    detail = {"dtype": np.int8, "quantization": (0.5, -3), "name": "in"}
    x = np.array([-1000.0, -1.0, 0.26, 0.74, 1000.0], dtype=np.float32)
    # round(x / 0.5) - 3, clipped to [-128, 127]
    assert litert.quantize_input(x, detail).tolist() == [-128, -5, -2, -2, 127]
    detail_u8 = {"dtype": np.uint8, "quantization": (0.1, 10), "name": "in"}
    assert litert.quantize_input(np.array([-5.0, 0.0, 0.5]), detail_u8).tolist() == [0, 10, 15]


def test_accuracy_counts_top1_over_the_whole_set(models):
    _, x, _, int8 = models
    pred = _batch1_reference(int8, x).argmax(1)
    y = pred.copy()
    y[:10] = (y[:10] + 1) % 4  # 10 of 37 labels now disagree with the model
    assert accuracy(int8, x, y, batch_size=8) == pytest.approx(27 / 37)
    assert accuracy(int8, x, np.eye(4)[y]) == pytest.approx(27 / 37)  # one-hot labels too


class FakeClock:
    """A clock that moves only when a fake model runs: each call of model ``m`` takes ``cost[m]`` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_models(cost):
    clock, calls = FakeClock(), []

    def runner(path, threads):
        calls.append(("build", path, threads))

        def invoke():
            calls.append((path, threads))
            clock.now += cost[path] * (1 + 0.1 * (threads - 1))
        return invoke
    return clock, calls, runner


def test_latency_rounds_interleave_the_models_after_warm_up():
    clock, calls, runner = _fake_models({"a.tflite": 0.001, "b.tflite": 0.003, "c.tflite": 0.002})
    paths = {"A": "a.tflite", "B": "b.tflite", "C": "c.tflite"}
    out = litert.latency_rounds(paths, np.zeros(3, np.float32), [1, 2], rounds=4, round_seconds=0.01,
                                warmup_seconds=0.02, min_runs_per_round=2, clock=clock, runner=runner)
    order = [("a.tflite", 1), ("a.tflite", 2), ("b.tflite", 1), ("b.tflite", 2), ("c.tflite", 1), ("c.tflite", 2)]
    builds = [c for c in calls if c[0] == "build"]
    assert [c[1:] for c in builds] == order  # every interpreter exists before any timing
    invokes = [c for c in calls if c[0] != "build"]
    firsts, rest = invokes[:6], invokes[6:]
    assert firsts == order  # one first run each, as built
    # then warm-up model by model, then rounds: each round visits every (model, threads) once, in order
    runs = [list(g) for _, g in __import__("itertools").groupby(rest)]
    visited = [r[0] for r in runs]
    assert visited == order + order * 4
    for burst, (path, threads) in zip(runs[6:], order * 4):
        cost = {"a.tflite": 0.001, "b.tflite": 0.003, "c.tflite": 0.002}[path] * (1 + 0.1 * (threads - 1))
        assert len(burst) == max(2, int(np.ceil(0.01 / cost - 1e-9)))  # round_seconds, at least min_runs_per_round
    # the statistics are the fake clock's durations, so they are exact here
    assert out["B"]["1"]["median_ms"] == pytest.approx(3.0)
    assert out["A"]["2"]["q1_ms"] == pytest.approx(1.1) and out["A"]["2"]["q3_ms"] == pytest.approx(1.1)
    assert out["C"]["1"]["rounds"] == 4
    assert set(out["A"]["1"]) == {"threads", *LATENCY_FIELDS}  # the record results.py defines, whole


def test_latency_of_a_real_model_gives_ordered_statistics(models):
    _, x, fp32, int8 = models
    out = litert.latency_rounds({"f": fp32, "q": int8}, x[0], [1], rounds=3, round_seconds=0.01,
                                warmup_seconds=0.01)
    for name in ("f", "q"):
        lat = out[name]["1"]
        assert 0 < lat["min_ms"] <= lat["q1_ms"] <= lat["median_ms"] <= lat["q3_ms"] <= lat["max_ms"]
        assert lat["runs"] >= 3 * 5 and lat["init_ms"] > 0 and lat["first_ms"] > 0
    assert latency(int8, x[0], num_threads=2, rounds=3, round_seconds=0.0, warmup_seconds=0.0)["runs"] == 15


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory is read from Linux's /proc")
def test_peak_memory_grows_with_the_weights_the_model_holds(tmp_path):
    big = keras.Sequential([keras.layers.Input((16, 16, 4)), keras.layers.Flatten(), keras.layers.Dense(1024)])
    small = keras.Sequential([keras.layers.Input((16, 16, 4)), keras.layers.Flatten(), keras.layers.Dense(4)])
    big_file = write_bytes(tmp_path / "big.tflite", convert(big, "fp32"))  # 1024 × 1024 float weights: 4 MiB
    small_file = write_bytes(tmp_path / "small.tflite", convert(small, "fp32"))
    got_big, got_small = litert.peak_memory(big_file), litert.peak_memory(small_file)
    assert "VmHWM" in got_big["method"]
    assert got_big["peak_bytes"] >= 4 * 2 ** 20  # its weights are read, so they are resident
    assert got_big["peak_bytes"] > got_small["peak_bytes"] + 3 * 2 ** 20


def test_runtime_info_reports_this_machine():
    info = runtime_info()
    assert info["cores"] == os.cpu_count()
    assert info["litert_version"] == ai_edge_litert.__version__
    assert info["tensorflow_version"] == tf.__version__
    assert info["python"] == platform.python_version()
    assert info["platform"] == platform.platform()
    expected_cpu = None
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                expected_cpu = line.split(":", 1)[1].strip()
                break
    if expected_cpu:
        assert info["cpu"] == expected_cpu
    assert isinstance(info["cpu"], str) and info["cpu"]


def test_wrong_shapes_are_refused(models):
    _, x, fp32, _ = models
    with pytest.raises(ValueError, match="no batch axis"):
        latency(fp32, x[:1], num_threads=1)
    with pytest.raises(ValueError, match="takes"):
        TFLiteModel(fp32).predict(x[..., :1])
