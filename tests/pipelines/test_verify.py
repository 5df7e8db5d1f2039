"""`python -m pipelines.verify`: a fresh bundle passes; each kind of damage is one line, exit 1;
a malformed bundle is one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edge_kd.export.bundle import write_bundle
from edge_kd.export.tflite import convert
from edge_kd.fileio import write_bytes
from edge_kd.keras import keras, tf
from pipelines.verify import main, verify

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "edge_kd" / "_data" / "mnist.npz"
MEASURED = {"name": "m", "accuracy": 0.97, "latency_ms": {"1": 0.02}, "size_bytes": 1000, "gzip_bytes": 900,
            "sparsity": 0.0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = np.load(MNIST)
    tf.keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(6, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    calib = (d["x_train"][:200, ..., None] / 255.0).astype(np.float32)
    out = tmp_path_factory.mktemp("verify-models")
    return {"int8": write_bytes(out / "m-int8.tflite", convert(model, "int8", representative=calib)),
            "fp32": write_bytes(out / "m-fp32.tflite", convert(model, "fp32")),
            "golden": d["x_test"][:10, ..., None]}


def _bundle(sources, tmp_path, variant="int8"):
    return write_bundle(tmp_path / f"bundle-{variant}", sources[variant], class_names=[str(i) for i in range(10)],
                        input_scale=1 / 255, input_offset=0.0, channel_order="grayscale",
                        golden_x_raw=sources["golden"], measured=MEASURED, recipe_hash="h", version="0.1.0")


def _run(capsys, path):
    code = main([str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_a_fresh_bundle_passes(sources, tmp_path, capsys, variant):
    b = _bundle(sources, tmp_path, variant)
    assert verify(b) == []
    code, out, err = _run(capsys, b)
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith(f"OK {b}: m-{variant}.tflite sha256 matches")
    assert ("10 golden outputs bit-exact" in out) == (variant == "int8")


def test_the_command_line_entry_point(sources, tmp_path):
    b = _bundle(sources, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "pipelines.verify", str(b)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("OK ") and ok.stdout.count("\n") == 1
    assert ok.stderr == ""  # LiteRT's native "INFO: Created ... XNNPACK delegate" line is kept off the terminal
    (b / "manifest.json").unlink()
    bad = subprocess.run([sys.executable, "-m", "pipelines.verify", str(b)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"error: {b}: no manifest.json\n"


def test_golden_outputs_reproduce_in_two_separate_interpreters(sources, tmp_path):
    b = _bundle(sources, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    x = np.load(b / "golden" / "inputs.npy")
    expected = np.load(b / "golden" / "expected_outputs.npy")
    # Prepared here from the manifest's numbers alone: raw * scale + offset, then its input quantization.
    q = m["input_quantization"]
    f = x.astype(np.float32) * np.float32(m["input_scale"]) + np.float32(m["input_offset"])
    xq = np.clip(np.round(f / np.float32(q["scale"])) + q["zero_point"], -128, 127).astype(np.int8)
    assert np.array_equal(xq, x.astype(np.int16) - 128)  # what the manifest's table says for this model
    runs = []
    for _ in range(2):
        it = Interpreter(model_path=str(b / m["model_file"]))
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        ys = []
        for sample in xq:
            it.set_tensor(inp["index"], sample[None])
            it.invoke()
            ys.append(it.get_tensor(out["index"])[0].copy())
        runs.append(np.stack(ys))
    assert np.array_equal(runs[0], expected) and np.array_equal(runs[1], expected)


def test_a_flipped_model_byte_fails(sources, tmp_path, capsys):
    b = _bundle(sources, tmp_path)
    model = b / "m-int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, out, err = _run(capsys, b)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"FAIL {b}: m-int8.tflite sha256 ") and "differs from the manifest" in err


def test_an_altered_golden_output_fails(sources, tmp_path, capsys):
    b = _bundle(sources, tmp_path)
    y = np.load(b / "golden" / "expected_outputs.npy")
    y[3, 7] = np.int8(y[3, 7] + 1 if y[3, 7] < 127 else y[3, 7] - 1)
    np.save(b / "golden" / "expected_outputs.npy", y)
    code, out, err = _run(capsys, b)
    assert code == 1 and err.count("\n") == 1
    assert "golden outputs differ at 1 of 100 values in 1 of 10 images (max |diff| 1)" in err


def test_float_golden_outputs_allow_1e_5(sources, tmp_path, capsys):
    b = _bundle(sources, tmp_path, "fp32")
    path = b / "golden" / "expected_outputs.npy"
    y = np.load(path)
    np.save(path, y + np.float32(5e-6))
    assert _run(capsys, b)[0] == 0
    y[0, 0] += np.float32(1e-3)
    np.save(path, y)
    code, _, err = _run(capsys, b)
    assert code == 1 and "golden outputs differ at 1 of 100 values in 1 of 10 images" in err


@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_an_altered_input_scale_fails(sources, tmp_path, capsys, variant):
    b = _bundle(sources, tmp_path, variant)
    _edit_manifest(b, input_scale=1.2 / 255)
    code, out, err = _run(capsys, b)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "golden outputs differ" in err
    if variant == "int8":  # the stated raw → int8 table no longer follows from the formula either
        assert "raw_pixel_to_input differs from its formula" in err


def test_manifest_details_that_are_not_the_models_fail(sources, tmp_path, capsys):
    b = _bundle(sources, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    _edit_manifest(b, input_quantization={**m["input_quantization"], "zero_point": 0}, output_shape=[1, 11])
    code, _, err = _run(capsys, b)
    assert code == 1 and err.count("\n") == 1
    assert 'manifest input_quantization {"scale": ' in err and '"zero_point": 0}' in err
    assert "manifest output_shape [1, 11] differs from the model's [1, 10]" in err
    _edit_manifest(b, input_quantization=m["input_quantization"], output_shape=[1, 10], input_dtype="float32")
    assert "manifest input_dtype \"float32\" differs from the model's \"int8\"" in _run(capsys, b)[2]


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
    (lambda b: (b / "m-int8.tflite").unlink(), "model file m-int8.tflite named by the manifest is missing"),
    (lambda b: (b / "golden" / "inputs.npy").unlink(), "golden/inputs.npy is missing"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "not readable JSON"),
    (lambda b: (b / "golden" / "expected_outputs.npy").write_bytes(b"garbage"), "not a readable .npy"),
    (lambda b: _edit_manifest(b, model_file="../m-int8.tflite"), "model_file must be a file name inside the bundle"),
    (lambda b: (b / "labels.txt").unlink(), "labels.txt is missing"),
])
def test_a_malformed_bundle_is_one_line_and_exit_2(sources, tmp_path, capsys, damage, message):
    b = _bundle(sources, tmp_path)
    damage(b)
    code, out, err = _run(capsys, b)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and message in err


def test_a_manifest_missing_keys_is_exit_2(sources, tmp_path, capsys):
    b = _bundle(sources, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    del m["model_sha256"], m["output_dtype"]
    (b / "manifest.json").write_text(json.dumps(m))
    code, _, err = _run(capsys, b)
    assert code == 2 and err.strip().endswith("missing key(s) model_sha256, output_dtype")
    assert _run(capsys, tmp_path / "nowhere")[0] == 2
    assert main([]) == 2


def test_labels_that_do_not_fit_fail(sources, tmp_path, capsys):
    b = _bundle(sources, tmp_path)
    (b / "labels.txt").write_text("".join(f"{i}\n" for i in range(9)))
    code, _, err = _run(capsys, b)
    assert code == 1 and err.count("\n") == 1
    assert "labels.txt (9 lines) differs from the manifest's class_names (10)" in err
    assert "labels.txt has 9 class names for 10 model outputs" in err
