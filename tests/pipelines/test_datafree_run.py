"""A run without training images (``data.source: synthetic``): the student is distilled on images its synthesize
stage made from the teacher alone, exported and benchmarked; without a test set the report says accuracy is
unknown and gives the agreement with the teacher on held-out synthetic images; the generator's rounds resume; a
recipe that cannot run without data is refused in one line."""
import io
import json

import numpy as np
import pytest

from edge_kd import data
from edge_kd.errors import UserError
from edge_kd.keras import keras
from pipelines import recipe as recipe_mod
from pipelines.run import run
from tests.pipelines.stopped import stop_after_part, store_without_synthesis

RECIPE = {
    "seed": 0,
    "data": {"source": "synthetic", "classes": 10, "input_shape": [28, 28, 1], "val_fraction": 0.25},
    "teacher": {"path": "builtin:fashion_mnist"},
    "student": {"arch": "cnn", "options": {"filters": [8]}},
    "training": {"batch_size": 16, "learning_rate": 0.002},
    "distillation": {"hard_weight": 0.0, "terms": [{"name": "hinton", "weight": 1.0, "temperature": 2.0}]},
    "stages": {"synthesize": {"method": "generator", "images": 40, "batch_size": 10,
                              "generator": {"steps": 6, "rounds": 2, "student_steps": 1, "latent": 8,
                                            "diversity": 1.0}},
               "distill": {"epochs": 1},
               "export": {"variants": ["fp32", "int8"]},
               "benchmark": {"threads": [1], "min_seconds": 0.1, "rounds": 3, "warmup_seconds": 0.05,
                             "layer_error_samples": 16},
               "bundle": {}, "report": {}},
}


def _recipe(data_changes=None, **stages):
    d = json.loads(json.dumps(RECIPE))
    d["data"].update(data_changes or {})
    for name, settings in stages.items():  # None: without that stage
        d["stages"].pop(name) if settings is None else d["stages"].__setitem__(name, settings)
    return recipe_mod.from_dict(d)


@pytest.fixture(scope="module")
def datafree_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("datafree")
    return run(_recipe(), out=out, stream=io.StringIO(), store=out / "store")


def test_a_run_without_training_images_distils_on_synthetic_ones_and_reports_agreement(datafree_run):
    d = datafree_run
    with np.load(d / "synthetic" / "images.npz") as f:
        x, made_for, teacher = f["x"], f["y"], f["teacher"]
    assert x.shape == (40, 28, 28, 1) and np.bincount(made_for, minlength=10).tolist() == [4] * 10
    summary = json.loads((d / "manifests" / "synthesize.json").read_text())["summary"]
    assert summary["method"] == "generator" and summary["rounds"] == 2
    assert summary["teacher_agreement"] == pytest.approx(np.mean(teacher == made_for))
    # the student trained on the synthetic images (labelled with the teacher's classes), a quarter held out
    history = json.loads((d / "distill" / "history.json").read_text())
    assert len(history["val_accuracy"]) == 1
    bundle = data.synthetic_bundle(_recipe().data, x, teacher, seed=0)
    assert bundle.count("train") + bundle.count("val") == 40 and 8 <= bundle.count("val") <= 12
    rows = {m["name"]: m for m in json.loads((d / "results.json").read_text())["models"]}
    # no test set: no accuracy; each model's agreement with the teacher on the held-out synthetic images instead
    assert all(m["accuracy"] is None for m in rows.values())
    student = keras.models.load_model(d / "distill" / "student.keras", compile=False)
    xv, yv = bundle.arrays("val")
    agree = np.mean(np.argmax(student.predict(xv, verbose=0), -1) == yv)
    assert rows["student"]["val_accuracy"] == pytest.approx(agree)
    assert rows["teacher"]["val_accuracy"] == 1.0  # the held-out images' labels are the teacher's classes
    assert rows["student-int8"]["calibration"] == "synthetic"  # the only images there are
    report = (d / "report.md").read_text()
    assert "no test set" in report and "**accuracy is unknown**" in report
    assert "under LiteRT, the held-out synthetic images)" in report and "whole test set)" not in report
    assert f"`student` {100 * agree:.2f} %" in report
    assert "drawn from a generator trained 6 iterations against a student in 2 rounds" in report
    manifest = json.loads((d / "bundle" / "manifest.json").read_text())
    assert manifest["measured"]["accuracy"] is None


def test_the_generator_stopped_after_a_round_resumes_there_and_makes_the_same_images(datafree_run, tmp_path,
                                                                                    monkeypatch):
    stopped = stop_after_part(monkeypatch, 1, lambda: run(_recipe(), out=tmp_path / "out", stream=io.StringIO()))
    assert stopped.resume_at == "'synthesize', after its round 1"
    # the module's store without its synthetic images, which this run must make
    store = store_without_synthesis(datafree_run.parent / "store", tmp_path / "store")
    stream = io.StringIO()
    d = run(_recipe(), out=tmp_path / "out", stream=stream, store=store)
    assert "(resumed after round 1) ..." in stream.getvalue()
    assert "distill: finished by another run with the same settings, inputs and code" in stream.getvalue()
    with np.load(d / "synthetic" / "images.npz") as a, np.load(datafree_run / "synthetic" / "images.npz") as b:
        np.testing.assert_array_equal(a["x"], b["x"])


def test_the_student_can_start_from_the_companion_the_generator_was_trained_against(datafree_run, tmp_path):
    import models
    from pipelines.stages.synthesize import COMPANION

    companion = datafree_run / "synthetic" / COMPANION
    assert companion.is_file()  # the generator's companion student, as its last round left it
    fresh = models.build("cnn", (28, 28, 1), 10, filters=[8])
    models.load_weights(fresh, companion, "test")
    kept = fresh.get_layer("logits").get_weights()[0]
    # a step size too small to move a weight: the distilled student's weights are where it started
    stream = io.StringIO()
    d = run(_recipe(distill={"epochs": 1, "start": "companion", "learning_rate": 1e-12}), out=tmp_path / "out",
            stream=stream, store=datafree_run.parent / "store")
    assert "synthesize: finished by another run with the same settings, inputs and code" in stream.getvalue()
    started = keras.models.load_model(d / "distill" / "student.keras", compile=False).get_layer("logits")
    np.testing.assert_allclose(started.get_weights()[0], kept, atol=1e-6)
    assert "start the generator's companion student" in (d / "report.md").read_text()
    scratch = keras.models.load_model(datafree_run / "distill" / "student.keras", compile=False).get_layer("logits")
    assert np.abs(scratch.get_weights()[0] - kept).max() > 1e-3  # the default starts fresh, elsewhere


@pytest.mark.parametrize("data_changes, stages, words", [
    ({"classes": None}, {}, "data.classes must be given with data.source: synthetic"),
    ({"input_shape": [28, 28, 2]}, {}, "data.input_shape must end in 1 or 3 channels"),
    ({"test": "synthetic"}, {}, "data.test must be a labelled source"),
    ({}, {"synthesize": None}, "data.source synthetic has no training images: add stages.synthesize"),
    ({}, {"baseline": {}}, "stages.baseline trains the student on labelled ones: remove stages.baseline"),
    ({}, {"export": {"representative": "train"}}, "stages.export.representative: train has no training images"),
    ({}, {"distill": {"epochs": 1, "distill": False}}, "stages.distill.distill must stay true"),
    ({}, {"synthesize": {"method": "generator", "images": 4, "generator": {"rounds": 8}}},
     "stages.synthesize.images must be at least generator.rounds (8)"),
    ({}, {"distill": {"epochs": 1, "start": "companion"}, "synthesize": {"method": "deepinversion", "images": 40}},
     "stages.distill.start: companion starts the student from the one the generator was trained against: it needs "
     "stages.synthesize with method generator"),
    ({"source": "fashion_mnist", "classes": None, "input_shape": None}, {"distill": {"epochs": 1, "start": "companion"},
                                                                         "baseline": {}},
     "so the baseline (the student alone) cannot start from the same weights: remove stages.baseline or start fresh"),
])
def test_a_recipe_that_needs_training_images_is_a_one_line_error(data_changes, stages, words):
    with pytest.raises(UserError) as e:
        _recipe(data_changes, **stages)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_teacher_file_is_required_and_other_sources_refuse_the_synthetic_keys():
    d = json.loads(json.dumps(RECIPE))
    d["teacher"] = {"path": None}
    with pytest.raises(UserError, match="give the teacher's file in teacher.path"):
        recipe_mod.from_dict(d)
    with pytest.raises(UserError, match="data.classes is read only with data.source: synthetic"):
        recipe_mod.from_dict({"data": {"source": "mnist", "classes": 10}})
    d = json.loads(json.dumps(RECIPE))
    d["training"]["strategy"] = "multi_worker"
    with pytest.raises(UserError, match="a multi-worker job checks its training images on every worker before"):
        recipe_mod.from_dict(d)


def test_too_few_images_for_both_splits_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"^stages.synthesize.images 10 is 1 per class, of which data.val_fraction "
                                        r"0.25 holds out 0: a run without training images needs both splits"):
        run(_recipe(synthesize={"method": "generator", "images": 10, "batch_size": 10,
                                "generator": {"steps": 2, "rounds": 2}}), out=tmp_path, stream=io.StringIO())
    assert not list(tmp_path.glob("*/synthetic"))


def test_a_search_refuses_a_data_free_recipe_in_one_line(tmp_path, capsys):
    import yaml

    from pipelines.search.__main__ import main

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["--recipe", str(tmp_path / "r.yaml"), "--target-accuracy", "0.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "data.source synthetic has no training images: run the data-free recipe with python -m " \
           "pipelines.compress" in err[-1]


def test_the_test_set_of_a_synthetic_source_is_another_sources_test_split_resized(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "held.npz", x_train=rng.integers(0, 256, (6, 20, 20), dtype=np.uint8),
             y_train=np.arange(6) % 3, x_test=rng.integers(0, 256, (5, 20, 20), dtype=np.uint8),
             y_test=np.array([0, 1, 2, 1, 0]))
    cfg = data.DataConfig(source="synthetic", classes=["a", "b", "c"], input_shape=[16, 16, 1],
                          test=str(tmp_path / "held.npz"))
    x = rng.integers(0, 256, (30, 16, 16, 1), dtype=np.uint8)
    b = data.synthetic_bundle(cfg, x, np.arange(30) % 3, seed=0)
    assert b.info.class_names == ("a", "b", "c") and b.info.input_shape == (16, 16, 1)
    assert b.raw("test").shape == (5, 16, 16, 1) and b.labels("test").tolist() == [0, 1, 2, 1, 0]
    assert b.count("train") == 27 and b.count("val") == 3  # a tenth of each class held out
    # the digest is what the images were read from (the synthesize stage's result), with the test source's
    assert b.source_digest == data.synthetic_bundle(cfg, x, np.arange(30) % 3, seed=0).source_digest
    assert b.source_digest != data.synthetic_bundle(cfg, x, np.arange(30) % 3, seed=0, digest="made").source_digest
    with pytest.raises(UserError, match="data.val_fraction 0.1 of the 3 synthetic images leaves no validation image"):
        data.synthetic_bundle(cfg, x[:3], np.arange(3), seed=0)  # one per class: a tenth of one rounds to none
    with pytest.raises(UserError, match="data.test '.*' has 1-channel images and data.input_shape"):
        data.synthetic_bundle(cfg.model_copy(update={"input_shape": [16, 16, 3]}))
