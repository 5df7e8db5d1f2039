"""Minimum runtime and op versions, read from the files the converter makes; the bundle's min_runtime filter."""
import dataclasses

import numpy as np
import pytest

from edge_kd.bench.compat import loads_on, runtime, version_key
from edge_kd.bench.results import ModelRow
from edge_kd.errors import UserError
from edge_kd.export.bundle import pick
from edge_kd.export.tflite import convert
from edge_kd.keras import keras, tf


@pytest.fixture(scope="module")
def files():
    tf.keras.utils.set_random_seed(5)
    # Dynamic-range quantization leaves kernels under 1,024 weights in float: these two are larger.
    model = keras.Sequential([keras.layers.Input((8, 8, 4)), keras.layers.Conv2D(32, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    x = np.random.default_rng(5).normal(size=(16, 8, 8, 4)).astype(np.float32)
    return {v: convert(model, v, representative=x) for v in ("fp32", "dynamic", "dynamic_compat", "int8")}


def test_dynamic_range_dense_needs_2_17_and_its_compat_variant_loads_on_2_14(files):
    dyn, compat = runtime(files["dynamic"]), runtime(files["dynamic_compat"])
    # Per-channel dynamic-range dense weights are FULLY_CONNECTED v12, which TFLite 2.17 introduced.
    assert dyn == {"min_runtime": "2.17.0", "ops": {"CONV_2D": 5, "FULLY_CONNECTED": 12, "RESHAPE": 1}}
    assert compat["ops"]["FULLY_CONNECTED"] < 12 and compat["ops"]["CONV_2D"] == 5
    assert not loads_on(dyn["min_runtime"], "2.14") and loads_on(compat["min_runtime"], "2.14")
    assert version_key(compat["min_runtime"]) < version_key("2.14")


def test_plain_float_and_int8_files_load_on_old_runtimes(files):
    assert runtime(files["fp32"])["min_runtime"] == "1.5.0"
    assert runtime(files["int8"])["min_runtime"] == "1.14.0"
    assert runtime(files["int8"])["ops"]["CONV_2D"] == 3  # int8 per-channel conv


def test_versions_compare_numerically_and_bad_ones_are_refused():
    assert version_key("2.9") < version_key("2.14") < version_key("2.14.1")
    assert loads_on("2.14.0", "2.14") and not loads_on("2.14.1", "2.14") and not loads_on(None, "9.0")
    with pytest.raises(ValueError, match="2.14"):
        version_key("latest")


def _row(name, variant, acc, size, min_runtime):
    return ModelRow(name=name, role="student", format="tflite", variant=variant, path=f"tflite/{name}.tflite",
                    accuracy=acc, val_accuracy=acc, size_bytes=size, gzip_bytes=size, params=1, macs=1, input_scale=1 / 255,
                    input_offset=0.0, min_runtime=min_runtime)


def test_bundle_min_runtime_excludes_the_files_that_need_a_newer_runtime():
    rows = [_row("student-dynamic", "dynamic", 0.90, 20_000, "2.17.0"),
            _row("student-dynamic_compat", "dynamic_compat", 0.90, 20_100, "2.4.0"),
            _row("student-fp32", "fp32", 0.90, 80_000, "1.5.0")]
    assert pick(rows).name == "student-dynamic"  # smallest within tolerance, no runtime limit
    assert pick(rows, min_runtime="2.14").name == "student-dynamic_compat"
    with pytest.raises(UserError, match="does not load on 2.14"):
        pick(rows, name="student-dynamic", min_runtime="2.14")
    with pytest.raises(UserError, match="no student .tflite of this run loads on TFLite 1.4"):
        pick(rows, min_runtime="1.4")
    with pytest.raises(UserError, match="min_runtime"):
        pick(rows, min_runtime="new")
    # an integer variant within tolerance is still preferred over a smaller float one
    mixed = dataclasses.replace(rows[2], name="student-int8_mixed", variant="int8_mixed", size_bytes=30_000)
    assert pick([*rows, mixed], min_runtime="2.14").name == "student-int8_mixed"
