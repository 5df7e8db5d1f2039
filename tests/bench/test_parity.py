"""Keras ↔ TFLite parity against a bare interpreter run, and the op / XNNPACK-fallback listing against
LiteRT's own single-op delegation (delegate node fusion disabled: one DELEGATE node per taken op)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edge_kd.bench.parity import ops, parity
from edge_kd.export.tflite import convert
from edge_kd.fileio import write_bytes
from edge_kd.keras import keras, tf

MNIST = Path(__file__).resolve().parents[2] / "edge_kd" / "_data" / "mnist.npz"


def _bare(path, x):
    """Reference: one bare interpreter, batch resized to len(x), int8 I/O (de)quantized here."""
    it = Interpreter(model_path=str(path))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    if inp["dtype"] == np.int8:
        s, zp = inp["quantization"]
        x = np.clip(np.round(x / s) + zp, -128, 127).astype(np.int8)
    it.set_tensor(inp["index"], x)
    it.invoke()
    y = it.get_tensor(out["index"])
    if out["dtype"] == np.int8:
        s, zp = out["quantization"]
        y = (y.astype(np.float32) - zp) * s
    return y


def _single_op_fallbacks(path) -> Counter:
    """Reference: with delegate node fusion off, every op XNNPACK takes becomes its own DELEGATE node whose
    outputs are that op's outputs; the ops whose outputs no DELEGATE node produces are the fallbacks."""
    it = Interpreter(model_path=str(path), experimental_disable_delegate_node_fusion=True)
    it.allocate_tensors()
    nodes = it._get_ops_details()
    original = [n for n in nodes if n["op_name"] != "DELEGATE"]
    delegated_outputs = {int(t) for n in nodes if n["op_name"] == "DELEGATE" for t in n["outputs"]}
    return Counter(n["op_name"] for n in original if not {int(t) for t in n["outputs"]} & delegated_outputs)


@pytest.fixture(scope="module")
def mnist():
    d = np.load(MNIST)
    x_train = (d["x_train"][:10000, ..., None] / 255.0).astype(np.float32)
    x_test = (d["x_test"][..., None] / 255.0).astype(np.float32)
    return x_train, d["y_train"][:10000], x_test, d["y_test"]


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    x_train, y_train, x_test, y_test = mnist
    tf.keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.DepthwiseConv2D(3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    out = tmp_path_factory.mktemp("parity")
    return (model, write_bytes(out / "fp32.tflite", convert(model, "fp32")),
            write_bytes(out / "int8.tflite", convert(model, "int8", representative=x_train[:500])))


def test_fp32_parity_matches_a_bare_run(trained, mnist):
    model, fp32, _ = trained
    x = mnist[2][:2000]
    r = parity(model, fp32, x)
    ref_keras = model.predict(x, batch_size=500, verbose=0)
    ref_diff = np.abs(_bare(fp32, x) - ref_keras)
    assert r["n"] == 2000 and r["output_dtype"] == "float32" and r["output_scale"] is None
    assert r["max_abs_diff"] <= 1e-4  # measured 5.7e-6 .. 7.6e-6 on this stack over seeds 0-2
    assert abs(r["max_abs_diff"] - ref_diff.max()) <= 1e-5 and abs(r["mean_abs_diff"] - ref_diff.mean()) <= 1e-6
    assert r["top1_agreement"] == 1.0


def test_int8_parity_on_real_mnist(trained, mnist):
    model, _, int8 = trained
    _, _, x_test, y_test = mnist
    keras_y = model.predict(x_test, batch_size=1000, verbose=0)
    assert np.mean(keras_y.argmax(1) == y_test) > 0.85  # it learned something worth quantizing
    r = parity(model, int8, x_test)
    assert r["n"] == 10000 and r["output_dtype"] == "int8"
    assert r["output_scale"] == Interpreter(model_path=str(int8)).get_output_details()[0]["quantization"][0]
    # Measured 99.2–99.5 % over seeds 0–2.
    assert r["top1_agreement"] >= 0.98
    lite_y = _bare(int8, x_test)
    assert r["top1_agreement"] == np.mean(lite_y.argmax(1) == keras_y.argmax(1))
    diff = np.abs(lite_y - keras_y)
    # Logits beyond the calibrated range saturate, so the max is several units (4.7–6.5 measured) while the
    # mean stays near half a quantization step.
    assert abs(r["max_abs_diff"] - diff.max()) <= 1e-4 and abs(r["mean_abs_diff"] - diff.mean()) <= 1e-5
    assert r["mean_abs_diff"] <= r["output_scale"]


def _small(head=None):
    inp = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(10)(h)
    return keras.Model(inp, head(h) if head else h)


@pytest.fixture(scope="module")
def op_models(tmp_path_factory):
    tf.keras.utils.set_random_seed(2)
    x = np.random.default_rng(2).random((32, 16, 16, 3)).astype(np.float32)
    out = tmp_path_factory.mktemp("ops")
    softmax = _small(lambda h: keras.layers.Softmax()(h))
    # CUMSUM has no XNNPACK kernel; a Dense after it makes the graph split into two delegated partitions.
    cumsum = _small(lambda h: keras.layers.Dense(5)(keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=-1))(h)))
    paths = {v: write_bytes(out / f"softmax-{v}.tflite", convert(softmax, v, representative=x if v == "int8" else None))
             for v in ("fp32", "fp16", "int8")}
    paths["cumsum-fp32"] = write_bytes(out / "cumsum-fp32.tflite", convert(cumsum, "fp32"))
    return paths


def test_ops_lists_the_models_ops(op_models):
    cnn = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "MAX_POOL_2D": 1, "RESHAPE": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1}
    assert ops(op_models["fp32"])["ops"] == cnn
    assert ops(op_models["int8"])["ops"] == cnn  # int8 I/O: no QUANTIZE/DEQUANTIZE at the ends
    # fp16 weights are stored as float16 tensors, each widened by one DEQUANTIZE op.
    fp16 = ops(op_models["fp16"])["ops"]
    it = Interpreter(model_path=str(op_models["fp16"]))
    half = sum(1 for t in it.get_tensor_details() if t["dtype"] == np.float16)
    assert fp16 == {**cnn, "DEQUANTIZE": half} and half >= 3


def test_xnnpack_fallbacks_agree_with_single_op_delegation(op_models):
    measured = {name: ops(path) for name, path in op_models.items()}
    for name, path in op_models.items():
        assert measured[name]["xnnpack_fallback"] == dict(_single_op_fallbacks(path)), name
    # What this stack (ai-edge-litert 2.3.0) does: XNNPACK takes every op of the fp32/fp16 models, has no
    # quantized SOFTMAX (it stays on LiteRT's kernels), and no CUMSUM at all.
    assert {n: measured[n]["xnnpack_fallback"] for n in ("fp32", "fp16", "int8")} == {
        "fp32": {}, "fp16": {}, "int8": {"SOFTMAX": 1}}
    assert measured["cumsum-fp32"]["xnnpack_fallback"] == {"CUMSUM": 1}
    assert [measured[n]["xnnpack_partitions"] for n in ("fp32", "int8", "cumsum-fp32")] == [1, 1, 2]


def test_ops_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ops(tmp_path / "none.tflite")
