"""Per-layer quantization error, checked against NumPy on the tensors LiteRT dumps; selective and 16×8 files."""
import math

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edge_kd.bench.layer_error import compare, layer_errors, layer_name, op_outputs, worst_tensors
from edge_kd.export.tflite import convert
from edge_kd.keras import keras, tf


@pytest.fixture(scope="module")
def made():
    tf.keras.utils.set_random_seed(7)
    inp = keras.Input((12, 12, 2))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(8, 3, activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(h))
    x = np.random.default_rng(7).normal(size=(40, 12, 12, 2)).astype(np.float32)
    return model, x, convert(model, "fp32"), convert(model, "int8", representative=x)


def _nrmse(f, q):
    """The metric, computed here from scratch: ‖q − f‖ / ‖f‖."""
    return float(np.sqrt(np.sum((q.astype(np.float64) - f) ** 2) / np.sum(f.astype(np.float64) ** 2)))


def test_a_float_file_against_itself_has_no_error(made):
    _, x, fp32, _ = made
    e = layer_errors(fp32, fp32, x)
    assert [entry["layer"] for entry in e["layers"]] == ["c1", "c2", "gap", "(model output)"]
    for entry in e["layers"]:
        assert entry["nrmse"] == 0 and entry["rmse"] == 0 and entry["added"] == 0 and entry["snr_db"] is None
        assert entry["cosine"] == pytest.approx(1.0)
    assert e["worst"] == [] and e["worst_tensors"] == [] and e["samples"] == 40


def test_int8_errors_are_positive_finite_and_equal_numpy_on_the_dumped_tensors(made):
    _, x, fp32, int8 = made
    e = layer_errors(fp32, int8, x)
    _, f = op_outputs(fp32, x)
    _, q = op_outputs(int8, x)
    assert len(e["layers"]) == 4
    for entry in e["layers"]:
        assert 0 < entry["nrmse"] < 1 and math.isfinite(entry["snr_db"]) and entry["dtype"] == "int8"
        assert entry["nrmse"] == pytest.approx(_nrmse(f[entry["tensor"]], q[entry["tensor"]]), rel=1e-9)
        assert entry["snr_db"] == pytest.approx(-20 * math.log10(entry["nrmse"]))
    # the dumped int8 output is the interpreter's own int8 tensor, dequantized with its scale and zero point
    it = Interpreter(model_content=int8, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.resize_tensor_input(it.get_input_details()[0]["index"], list(x.shape))
    it.allocate_tensors()
    d_in, d_out = it.get_input_details()[0], it.get_output_details()[0]
    s, z = d_in["quantization"]
    it.set_tensor(d_in["index"], np.clip(np.round(x / s) + z, -128, 127).astype(np.int8))
    it.invoke()
    s, z = d_out["quantization"]
    assert np.array_equal(q[d_out["name"]], (it.get_tensor(d_out["index"]).astype(np.float32) - z) * s)


def test_keeping_the_worst_layer_in_float_lowers_its_error(made):
    model, x, fp32, int8 = made
    e = layer_errors(fp32, int8, x)
    worst = worst_tensors(e, 1)
    assert worst == e["worst_tensors"][:1] and layer_name(worst[0]) == e["worst"][0]
    mixed = convert(model, "int8_mixed", representative=x, float_tensors=worst)
    _, f = op_outputs(fp32, x)
    _, q_int8 = op_outputs(int8, x)
    _, q_mixed = op_outputs(mixed, x)
    before, after = _nrmse(f[worst[0]], q_int8[worst[0]]), _nrmse(f[worst[0]], q_mixed[worst[0]])
    assert after < before
    e_mixed = layer_errors(fp32, mixed, x)
    entry = next(m for m in e_mixed["layers"] if m["tensor"] == worst[0])
    assert entry["dtype"] == "float32" and entry["nrmse"] == pytest.approx(after, rel=1e-9)
    it = Interpreter(model_content=mixed)
    it.allocate_tensors()
    assert it.get_input_details()[0]["dtype"] == np.int8  # still an int8-in, int8-out model


def test_16x8_has_int16_activations_and_int8_weights(made):
    model, x, fp32, _ = made
    flat = convert(model, "int16x8", representative=x)
    it = Interpreter(model_content=flat, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    details = {d["index"]: d for d in it.get_tensor_details()}
    compute = [op for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(compute) == 3
    for op in compute:
        act, weights = details[op["inputs"][0]], details[op["inputs"][1]]
        assert np.dtype(act["dtype"]) == np.int16 and np.dtype(weights["dtype"]) == np.int8
        assert np.dtype(details[op["outputs"][0]]["dtype"]) == np.int16
    assert np.dtype(it.get_input_details()[0]["dtype"]) == np.float32  # float I/O, quantized inside
    e = layer_errors(fp32, flat, x)
    assert all(entry["dtype"] == "int16" for entry in e["layers"][:-1])


def test_compare_handles_zero_tensors():
    z = np.zeros((2, 3))
    assert compare(z, z) == {"rmse": 0.0, "nrmse": 0.0, "snr_db": None, "cosine": 1.0}
    assert compare(z, z + 1)["nrmse"] is None and compare(z, z + 1)["snr_db"] is None  # JSON has no inf
    with pytest.raises(ValueError, match="'int8_mixed' needs float_tensors"):
        convert(keras.Sequential([keras.layers.Input((2,)), keras.layers.Dense(1)]), "int8_mixed",
                representative=np.zeros((2, 2), np.float32))


def test_shapes_a_graph_computes_are_not_compared_as_activations():
    # a squeeze-and-excite gate as EfficientNet builds it: its Reshape keeps the batch dimension open, so the file
    # computes the target shape (SHAPE, STRIDED_SLICE to a scalar, PACK) next to the activations
    tf.keras.utils.set_random_seed(8)
    inp = keras.Input((8, 8, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    g = keras.layers.Reshape((1, 1, 4), name="se_reshape")(keras.layers.GlobalAveragePooling2D(name="se_squeeze")(h))
    g = keras.layers.Conv2D(4, 1, activation="sigmoid", name="se_gate")(g)
    h = keras.layers.Multiply(name="se_excite")([h, g])
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flat")(h)))
    x = np.random.default_rng(8).normal(size=(6, 8, 8, 4)).astype(np.float32)
    fp32, int8 = convert(model, "fp32"), convert(model, "int8", representative=x)
    _, values = op_outputs(fp32, x)
    assert any(v.ndim == 0 or not np.issubdtype(v.dtype, np.floating) for v in values.values())  # the shapes
    e = layer_errors(fp32, int8, x)
    assert {"c1", "se_gate", "se_excite"} <= {entry["layer"] for entry in e["layers"]}
    assert all(0 <= entry["nrmse"] < 1 and entry["dtype"] == "int8" for entry in e["layers"])
