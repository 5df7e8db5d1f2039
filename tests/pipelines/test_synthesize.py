"""The synthesize stage and data-free int8 calibration: a run makes images from the teacher alone (seeded, resumable
after any finished batch), calibrates its int8 files on them when ``stages.export.representative: synthetic``, and
its report says which set calibrated each file and shows the images; bad settings are one-line errors."""
import io
import json

import numpy as np
import pytest

from edge_kd.errors import UserError
from edge_kd.export import tflite
from edge_kd.keras import keras
from pipelines import recipe as recipe_mod
from pipelines.run import run
from tests.pipelines.stopped import stop_after_part, store_without_synthesis


def fashion_mnist_train(n):
    from edge_kd import data

    return data.load("fashion_mnist", limit_train=n, limit_test=10).first("train", n)[0]

RECIPE = {
    "seed": 0,
    "data": {"source": "fashion_mnist", "val_fraction": 0.1, "limit_train": 400, "limit_test": 100},
    "teacher": {"path": "builtin:fashion_mnist"},
    "student": {"arch": "cnn", "options": {"filters": [8]}},
    "training": {"batch_size": 64, "learning_rate": 0.002},
    "stages": {"synthesize": {"images": 30, "batch_size": 10, "steps": 8},
               "distill": {"epochs": 1},
               "export": {"variants": ["fp32", "int8"], "representative": "synthetic"},
               "benchmark": {"threads": [1], "min_seconds": 0.1, "rounds": 3, "warmup_seconds": 0.05,
                             "layer_error_samples": 16},
               "report": {}},
}


def _recipe(**stages):
    d = json.loads(json.dumps(RECIPE))
    for name, settings in stages.items():  # None: without that stage
        d["stages"].pop(name) if settings is None else d["stages"].__setitem__(name, settings)
    return recipe_mod.from_dict(d)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The run, with a stage store the other runs of this module share (a stage of the same fingerprint is taken
    from it, not made again)."""
    out = tmp_path_factory.mktemp("synth")
    return run(_recipe(), out=out, stream=io.StringIO(), store=out / "store")


def _store(synthetic_run):
    return synthetic_run.parent / "store"


def test_a_run_makes_images_from_the_teacher_and_calibrates_its_int8_files_on_them(synthetic_run):
    d = synthetic_run
    with np.load(d / "synthetic" / "images.npz") as f:
        x, y, said = f["x"], f["y"], f["teacher"]
    assert x.dtype == np.uint8 and x.shape == (30, 28, 28, 1) and len(y) == len(said) == 30
    assert np.bincount(y, minlength=10).tolist() == [3] * 10  # every class as often
    summary = json.loads((d / "manifests" / "synthesize.json").read_text())["summary"]
    assert summary["teacher_agreement"] == pytest.approx(np.mean(said == y))
    assert 0 < summary["bn_loss"] < summary["bn_loss_noise"]  # nearer the teacher's statistics than noise
    # the int8 file is exactly what the converter makes from the synthetic images, not from training images
    student = keras.models.load_model(d / "distill" / "student.keras", compile=False)
    synthetic = tflite.convert(student, "int8", representative=x.astype(np.float32) * np.float32(1 / 255))
    assert (d / "tflite" / "student-int8.tflite").read_bytes() == synthetic
    real = fashion_mnist_train(30)
    assert tflite.convert(student, "int8", representative=real) != synthetic
    rows = {m["name"]: m for m in json.loads((d / "results.json").read_text())["models"]}
    assert rows["student-int8"]["calibration"] == "synthetic" and rows["student-fp32"]["calibration"] is None
    report = (d / "report.md").read_text()
    assert "Calibrated on synthetic images made from the teacher alone (below): `student-int8`." in report
    assert "## Images made from the teacher alone (stage synthesize)" in report and "(synthetic.png)" in report
    png = (d / "synthetic.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png == (d / "synthetic" / "grid.png").read_bytes()


def test_synthesis_stopped_after_a_batch_resumes_there_and_makes_the_same_images(synthetic_run, tmp_path, monkeypatch):
    stopped = stop_after_part(monkeypatch, 2, lambda: run(_recipe(), out=tmp_path / "out", stream=io.StringIO()))
    assert stopped.resume_at == "'synthesize', after its batch 2"
    stream = io.StringIO()
    # the module's store without its synthetic images, which this run must make
    store = store_without_synthesis(_store(synthetic_run), tmp_path / "store")
    d = run(_recipe(), out=tmp_path / "out", stream=stream, store=store)
    assert "synthesize: synthesize 30 images from the teacher (DeepInversion, 8 steps a batch) (resumed after " \
           "batch 2) ..." in stream.getvalue()
    # the same images, so the stages after it have the fingerprints they had: taken from the store, not made again
    assert "export: finished by another run with the same settings, inputs and code" in stream.getvalue()
    with np.load(d / "synthetic" / "images.npz") as a, np.load(synthetic_run / "synthetic" / "images.npz") as b:
        np.testing.assert_array_equal(a["x"], b["x"])
    assert not (d / ".resume").exists()


@pytest.mark.parametrize("change, words", [
    ({"synthesize": None}, "stages.export.representative: synthetic calibrates on the images stages.synthesize "
                           "makes from the teacher; add that stage"),
    ({"synthesize": {"steps": 0}}, "stages.synthesize.steps must be an integer ≥ 1, got 0"),
])
def test_bad_settings_are_one_line_errors(change, words, tmp_path):
    with pytest.raises(UserError) as e:
        r = _recipe(**change)
        run(r, out=tmp_path, stream=io.StringIO())
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*/synthetic"))  # refused before anything ran


def test_a_teacher_without_batch_normalization_is_refused_before_anything_runs(tmp_path):
    inp = keras.Input((28, 28, 1))
    keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp))).save(tmp_path / "flat.keras")
    d = json.loads(json.dumps(RECIPE))
    d["teacher"] = {"path": str(tmp_path / "flat.keras")}
    with pytest.raises(UserError, match="^teacher '.*' has no BatchNormalization layer: DeepInversion matches"):
        run(recipe_mod.from_dict(d), out=tmp_path / "out", stream=io.StringIO())
    assert not list((tmp_path / "out").glob("*/distill"))


def test_a_teacher_the_run_would_train_without_batch_normalization_is_refused_before_it_trains(tmp_path):
    d = json.loads(json.dumps(RECIPE))
    d["teacher"] = {"path": None, "arch": "mlp", "epochs": 1}
    d["stages"]["teacher"] = {}
    with pytest.raises(UserError, match="^teacher '.*' has no BatchNormalization layer: DeepInversion matches"):
        run(recipe_mod.from_dict(d), out=tmp_path, stream=io.StringIO())
    assert not list(tmp_path.glob("*/teacher"))


def test_the_grid_shows_at_most_twenty_classes():
    from matplotlib.image import imread

    from edge_kd.report.images import image_grid_png

    x = np.zeros((60, 8, 8, 3), np.uint8)
    png = image_grid_png(x, np.arange(60) % 30, [f"c{i}" for i in range(30)], 2, "t")
    few = image_grid_png(x, np.arange(60) % 10, [f"c{i}" for i in range(10)], 2, "t")
    rows_30, rows_10 = imread(io.BytesIO(png)).shape[0], imread(io.BytesIO(few)).shape[0]
    assert rows_10 < rows_30 < 2.2 * rows_10  # 20 rows, not 30
