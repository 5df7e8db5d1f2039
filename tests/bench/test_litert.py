"""LiteRT helpers checked against a bare interpreter run and NumPy maths."""
import os
import platform
import time

import ai_edge_litert
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edge_kd.bench import litert
from edge_kd.bench.litert import TFLiteModel, accuracy, latency, runtime_info
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


def test_latency_follows_benchmark_model_minimums(models):
    _, x, _, int8 = models
    t = time.perf_counter()
    lat = latency(int8, x[0], num_threads=1, min_warmup_runs=3, min_warmup_seconds=0.1, min_runs=50,
                  min_seconds=0.3)
    wall = time.perf_counter() - t
    assert set(lat) == {"threads", "init_ms", "first_ms", "mean_ms", "std_ms", "p50_ms", "p90_ms", "runs"}
    assert lat["threads"] == 1
    assert lat["runs"] >= 50
    assert 0 < lat["p50_ms"] <= lat["p90_ms"]
    assert lat["init_ms"] > 0 and lat["first_ms"] > 0 and lat["std_ms"] >= 0
    # The timed invokes alone must add up to min_seconds (a tiny model needs far more than 50 runs).
    assert lat["runs"] * lat["mean_ms"] / 1e3 >= 0.3 * 0.999
    assert wall >= 0.1 + 0.3


def test_latency_stops_at_min_runs_when_time_is_met(models):
    _, x, fp32, _ = models
    lat = latency(fp32, x[0], num_threads=2, min_warmup_seconds=0.0, min_runs=60, min_seconds=0.0)
    assert lat["runs"] == 60 and lat["threads"] == 2


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
