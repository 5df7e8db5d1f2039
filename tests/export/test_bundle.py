"""The deployable bundle: every manifest field checked against a separate LiteRT interpreter, golden
outputs reproduced by hand-quantized inputs through another interpreter, and the choice of model."""
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edge_kd import fileio
from edge_kd.bench.results import ModelRow
from edge_kd.errors import UserError
from edge_kd.export import bundle as B
from edge_kd.export.bundle import measured_from, pick, write_bundle
from edge_kd.export.tflite import convert
from edge_kd.fileio import write_bytes
from edge_kd.keras import keras, tf

MNIST = Path(__file__).resolve().parents[2] / "edge_kd" / "_data" / "mnist.npz"
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MEASURED = {"name": "student-int8", "accuracy": 0.9889, "latency_ms": {"1": 0.014, "2": 0.013},
            "size_bytes": 18400, "gzip_bytes": 14800, "sparsity": 0.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = np.load(MNIST)
    tf.keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    calib = (d["x_train"][:200, ..., None] / 255.0).astype(np.float32)
    out = tmp_path_factory.mktemp("models")
    fp32 = write_bytes(out / "student-fp32.tflite", convert(model, "fp32"))
    int8 = write_bytes(out / "student-int8.tflite", convert(model, "int8", representative=calib))
    golden = d["x_test"][:12, ..., None]  # real test images, raw uint8
    return model, fp32, int8, golden


def _write(dest, model_path, golden, **kw):
    args = dict(class_names=CLASSES, input_scale=1 / 255, input_offset=0.0, channel_order="grayscale",
                golden_x_raw=golden, measured=MEASURED, recipe_hash="r3c1pe", version="0.1.0")
    args.update(kw)
    return write_bundle(dest, model_path, **args)


def _reference_outputs(model_path, raw):
    """Independent reference: a fresh interpreter, inputs normalised and quantized here with NumPy, batch 1."""
    it = Interpreter(model_path=str(model_path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    ys = []
    for img in raw:
        x = img[None].astype(np.float32) / np.float32(255.0)
        if inp["dtype"] == np.int8:
            s, zp = inp["quantization"]
            x = np.clip(np.round(x / np.float32(s)) + zp, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], x)
        it.invoke()
        ys.append(it.get_tensor(out["index"])[0].copy())
    return np.stack(ys)


def test_int8_bundle_holds_the_model_its_real_details_and_reproducible_golden_outputs(models, tmp_path):
    _, _, int8, golden = models
    dest = _write(tmp_path / "bundle", int8, golden)
    assert dest == tmp_path / "bundle"
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["README.md", "golden/expected_outputs.npy", "golden/inputs.npy", "labels.txt", "manifest.json",
                     "student-int8.tflite"]
    assert (dest / "student-int8.tflite").read_bytes() == Path(int8).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left beside it

    m = json.loads((dest / "manifest.json").read_text())
    it = Interpreter(model_path=str(int8))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert m["model_file"] == "student-int8.tflite"
    assert m["model_sha256"] == hashlib.sha256(Path(int8).read_bytes()).hexdigest()
    assert m["input_shape"] == [1, 28, 28, 1] == [int(v) for v in inp["shape"]]
    assert m["output_shape"] == [1, 10] == [int(v) for v in out["shape"]]
    assert (m["input_dtype"], m["output_dtype"]) == ("int8", "int8")
    assert (m["layout"], m["channel_order"]) == ("NHWC", "grayscale")
    assert (m["input_quantization"]["scale"], m["input_quantization"]["zero_point"]) == inp["quantization"]
    assert (m["output_quantization"]["scale"], m["output_quantization"]["zero_point"]) == out["quantization"]
    assert (m["input_scale"], m["input_offset"]) == (1 / 255, 0.0)
    assert m["class_names"] == CLASSES
    assert m["measured"] == MEASURED
    assert (m["recipe_hash"], m["edge_kd_version"]) == ("r3c1pe", "0.1.0")
    # Calibrated on MNIST (pixels 0..255 → 0..1), the input quantization is 1/255 with zero point -128,
    # so the stated table is exactly raw - 128 and the formula shows these numbers.
    assert inp["quantization"][1] == -128 and abs(inp["quantization"][0] - 1 / 255) < 1e-9
    assert m["raw_pixel_to_input"] == list(range(-128, 128))
    assert "- 128, -128, 127" in m["input_formula"] and "0.003921569" in m["input_formula"]
    assert (dest / "labels.txt").read_text() == "\n".join(CLASSES) + "\n"

    x = np.load(dest / "golden" / "inputs.npy")
    y = np.load(dest / "golden" / "expected_outputs.npy")
    assert x.dtype == np.uint8 and np.array_equal(x, golden)
    assert y.dtype == np.int8 and y.shape == (12, 10)
    assert np.array_equal(y, _reference_outputs(int8, golden))
    assert len(np.unique(y)) > 5  # real outputs, not a constant


def test_fp32_bundle_has_float_io_and_outputs_that_match_keras(models, tmp_path):
    model, fp32, _, golden = models
    dest = _write(tmp_path / "b", fp32, golden, channel_order=None)  # inferred from C = 1
    m = json.loads((dest / "manifest.json").read_text())
    assert (m["input_dtype"], m["output_dtype"]) == ("float32", "float32")
    assert m["input_quantization"] is None and m["output_quantization"] is None
    assert m["raw_pixel_to_input"] is None and m["channel_order"] == "grayscale"
    y = np.load(dest / "golden" / "expected_outputs.npy")
    assert y.dtype == np.float32
    assert np.max(np.abs(y - _reference_outputs(fp32, golden))) <= 1e-6
    keras_y = model.predict(golden.astype(np.float32) / 255.0, verbose=0)
    assert np.max(np.abs(y - keras_y)) <= 1e-4


def test_readme_spells_out_this_models_preprocessing_in_kotlin_and_swift(models, tmp_path):
    _, fp32, int8, golden = models
    q = json.loads((_write(tmp_path / "q", int8, golden) / "manifest.json").read_text())
    text = (tmp_path / "q" / "README.md").read_text()
    oq = q["output_quantization"]
    for needle in ("student-int8.tflite", "q = raw - 128", "const val IN_ZERO_POINT = -128",
                   f"const val OUT_ZERO_POINT = {oq['zero_point']}",
                   "ByteBuffer.allocateDirect(784)", "Math.rint", "interpreter.run(input, output)", "ByteArray(10)",
                   "TensorFlowLite", "rounded(.toNearestOrEven)", "bindMemory(to: Int8.self)", "interpreter.invoke()",
                   "forResource: \"student-int8\"", "labels.txt", "golden/expected_outputs.npy", "98.89 %"):
        assert needle in text, needle
    # The Kotlin and Swift literals parse back to the tensors' exact float32 scales.
    for pattern, value in ((r"const val IN_Q_SCALE = ([0-9.e-]+)f", q["input_quantization"]["scale"]),
                           (r"const val OUT_SCALE = ([0-9.e-]+)f", oq["scale"]),
                           (r"let outScale: Float = ([0-9.e-]+)", oq["scale"])):
        assert np.float32(float(re.search(pattern, text).group(1))) == np.float32(value), pattern
    text = (_write(tmp_path / "f", fp32, golden, measured={**MEASURED, "name": "student-fp32"}) / "README.md").read_text()
    for needle in ("ByteBuffer.allocateDirect(4 * 784)", "putFloat(raw.toFloat() * INPUT_SCALE + INPUT_OFFSET)",
                   "FloatArray(10)", "bindMemory(to: Float32.self)", "INPUT_SCALE = 0.003921569f"):
        assert needle in text, needle
    assert "IN_Q_SCALE" not in text and "[Int8]" not in text and "ByteArray" not in text and "rint" not in text


def test_readme_templates_have_the_same_parts_for_every_variant():
    def parts(variant):
        return list(B._parts(f"bundle_readme_{variant}.md"))

    # a part missing from one variant's file would only fail for the models that take that variant
    assert parts("grayscale") == parts("rgb") and {o.lower() for o in B.CHANNEL_ORDERS} == {"grayscale", "rgb"}
    for side in ("input", "output"):
        assert len({tuple(parts(f"{dt}_{side}")) for dt in B.IO_DTYPES}) == 1, side


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "step-aside"])
def test_rewriting_replaces_the_bundle_and_a_failed_write_keeps_the_old_one(models, tmp_path, monkeypatch, exchange):
    _, fp32, int8, golden = models
    calls = []
    real = fileio._exchange
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: calls.append(1) or (real(a, b) if exchange else False))
    dest = tmp_path / "bundle"
    _write(dest, fp32, golden)
    _write(dest, int8, golden[:3], class_names=[c.upper() for c in CLASSES])
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "golden", "labels.txt", "manifest.json",
                                                      "student-int8.tflite"]
    assert (dest / "labels.txt").read_text().splitlines() == [c.upper() for c in CLASSES]
    assert len(np.load(dest / "golden" / "inputs.npy")) == 3
    assert calls == [1] and [p.name for p in tmp_path.iterdir()] == ["bundle"]

    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    monkeypatch.setattr(B, "_readme", lambda m: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        _write(dest, fp32, golden)
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_bad_arguments_are_refused_before_anything_is_written(models, tmp_path):
    _, fp32, _, golden = models
    with pytest.raises(ValueError, match="9 class names for a model with 10 outputs"):
        _write(tmp_path / "b", fp32, golden, class_names=CLASSES[:9])
    with pytest.raises(ValueError, match="channel_order"):
        _write(tmp_path / "b", fp32, golden, channel_order="RGB")
    with pytest.raises(ValueError, match="uint8"):
        _write(tmp_path / "b", fp32, golden.astype(np.float32))
    with pytest.raises(ValueError, match="measured lacks gzip_bytes"):
        _write(tmp_path / "b", fp32, golden, measured={k: v for k, v in MEASURED.items() if k != "gzip_bytes"})
    with pytest.raises(ValueError, match="fraction 0..1"):
        _write(tmp_path / "b", fp32, golden, measured={**MEASURED, "accuracy": 98.89})
    with pytest.raises(UserError, match="no model file"):
        _write(tmp_path / "b", tmp_path / "absent.tflite", golden)
    assert list(tmp_path.iterdir()) == []


def _row(name, variant, val, size, role="student", fmt="tflite", test=None):
    """A row with validation accuracy ``val`` and test accuracy ``test`` (the same unless given)."""
    return ModelRow(name=name, role=role, format=fmt, variant=variant, path=f"tflite/{name}.{fmt}",
                    accuracy=val if test is None else test, val_accuracy=val, size_bytes=size, gzip_bytes=size // 2,
                    params=1000, macs=2000, input_scale=1 / 255, input_offset=0.0)


ROWS = [  # the accuracies are validation ones (the pick's), equal to the test ones here
    _row("teacher", "fp32", 0.9925, 3_260_000, role="teacher", fmt="keras"),
    _row("student", "fp32", 0.9930, 90_000, fmt="keras"),  # a Keras row is never bundled, however accurate
    _row("teacher-fp32", "fp32", 0.9925, 3_223_000, role="teacher"),
    _row("student-fp32", "fp32", 0.9900, 59_300),
    _row("student-fp16", "fp16", 0.9900, 31_800),
    _row("student-dynamic", "dynamic", 0.9889, 17_700),
    _row("student-int8", "int8", 0.9889, 18_400),
    _row("qat-int8", "int8", 0.9876, 12_000),
    _row("pruned-int8", "int8", 0.9850, 9_000),  # exactly 0.5 pp under the best student tflite
]


def test_pick_takes_the_smallest_int8_within_the_tolerance_of_the_best_student():
    assert pick(ROWS).name == "pruned-int8"  # 0.9850 >= 0.9900 - 0.005, and the smallest int8
    assert pick(ROWS, tolerance_pp=0.2).name == "student-int8"  # qat-int8 (0.9876) is 0.24 pp under
    assert pick(ROWS, tolerance_pp=0.12).name == "student-int8"  # not the 700 B smaller dynamic: int8 first
    assert pick(ROWS, tolerance_pp=0.0).name == "student-fp16"  # no int8 within: the smallest of any variant


def test_pick_compares_validation_accuracy_never_test_accuracy():
    rows = [_row("student-fp32", "fp32", 0.9900, 59_300, test=0.9900),
            _row("qat-int8", "int8", 0.9880, 12_000, test=0.9750),
            _row("pruned-int8", "int8", 0.9800, 9_000, test=0.9950)]
    # On test, pruned-int8 would be the best and the smallest; on validation it is 1 pp under student-fp32.
    assert pick(rows).name == "qat-int8"
    assert pick(rows, tolerance_pp=1.0).name == "pruned-int8"
    # A candidate without a validation accuracy cannot be compared; naming the model needs none.
    rows.append(dataclasses.replace(rows[2], name="cluster-int8", val_accuracy=None))
    with pytest.raises(ValueError, match=r"validation accuracy .*not measured for cluster-int8:"):
        pick(rows)
    assert pick(rows, name="cluster-int8") is rows[3]
    unmeasured = [dataclasses.replace(r, val_accuracy=None) for r in ROWS]
    assert pick(unmeasured, name="student-int8").name == "student-int8"
    with pytest.raises(ValueError, match="student-fp32, student-fp16, student-dynamic, student-int8, qat-int8, "
                                         "pruned-int8: measure it"):
        pick(unmeasured)  # the teacher's and the Keras rows are no candidates, so they need none


def test_pick_by_name_and_unknown_names():
    assert pick(ROWS, name="teacher-fp32") is ROWS[2]
    assert pick(ROWS, name="student-fp16") is ROWS[4]
    with pytest.raises(UserError) as e:
        pick(ROWS, name="student")  # the Keras model is not a bundle candidate
    msg = str(e.value)
    assert "unknown model 'student'" in msg and "\n" not in msg
    assert msg.endswith("teacher-fp32, student-fp32, student-fp16, student-dynamic, student-int8, qat-int8, pruned-int8")
    with pytest.raises(UserError, match="no student .tflite"):
        pick(ROWS[:3])
    with pytest.raises(UserError, match=">= 0"):
        pick(ROWS, tolerance_pp=-1)


def test_measured_from_takes_a_models_json_row():
    row = dataclasses.replace(ROWS[6], gzip_bytes=14_800, sparsity=0.01,
                              latency={"1": {"median_ms": 0.014, "q1_ms": 0.013, "q3_ms": 0.02, "runs": 9},
                                       "2": {"median_ms": 0.013, "q1_ms": 0.012, "q3_ms": 0.015, "runs": 9}},
                              memory={"peak_bytes": 3_500_000, "method": "VmHWM"})
    assert measured_from(row) == {"name": "student-int8", "variant": "int8", "accuracy": 0.9889,
                                  "latency_ms": {"1": {"median_ms": 0.014, "q1_ms": 0.013, "q3_ms": 0.02},
                                                 "2": {"median_ms": 0.013, "q1_ms": 0.012, "q3_ms": 0.015}},
                                  "size_bytes": 18_400, "gzip_bytes": 14_800, "sparsity": 0.01,
                                  "peak_memory_bytes": 3_500_000, "memory_method": "VmHWM"}
