"""Each source of knowledge through the staged pipeline: distill, prune and PQAT with the same family.

Runs in-process on a tiny generated dataset (12×12, 3 classes): what is checked is that every mode
reaches the prune and QAT stages unchanged and exports a pruned int8 student (that file alone), not accuracy.
The mean-teacher, mutual-learning and teacher-free runs are marked heavy (``pytest -m heavy``): their terms and
modes train inside the Distiller in tests/distill/test_families.py in the default run.
"""
import json

import numpy as np
import pytest

from edge_kd.bench import stats
from edge_kd.keras import keras
from pipelines import compress

from .test_compress import _npz

FAST = ["--epochs", "1", "--threads", "1", "--set", "prune.epochs=1", "--set", "qat.epochs=1",
        "--set", "export.variants=[int8]", "--set", "export.models=final", "--set", "benchmark.min_seconds=0.1",
        "--set", "benchmark.layer_error_samples=16",
        "--set", "benchmark.warmup_seconds=0.05", "--set", "bundle=false"]


def _teacher(path, input_shape, softmax):
    """A small trained-looking Functional teacher with a named hidden layer ``feat``."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(input_shape)
    h = keras.layers.Dense(16, activation="relu", name="feat")(keras.layers.Flatten()(inp))
    keras.Model(inp, keras.layers.Dense(3, activation="softmax" if softmax else None)(h)).save(path)
    return path


def _run(tmp_path, capsys, name, *args):
    data = _npz(tmp_path / "d.npz", n_train=120, n_test=40)
    out = tmp_path / "out"
    code = compress.main(["--data", str(data), "--student", "mlp", "--set", "student.options.hidden=[16]",
                          "--out", str(out), "--run-name", name, *FAST, *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    run = out / name
    results = json.loads((run / "results.json").read_text())
    qat_row = next(m for m in results["models"] if m["name"] == "qat-int8")
    assert qat_row["sparsity"] == pytest.approx(0.75, abs=0.02)
    assert stats.tflite_weight_sparsity(run / qat_row["path"])["overall"] == pytest.approx(0.75, abs=0.02)
    return run, results, captured.out


@pytest.mark.heavy
def test_mean_teacher_distils_prunes_and_quantizes(tmp_path, capsys):
    run, results, out = _run(tmp_path, capsys, "mean", "--set", "teacher=null", "--set", "stages.teacher=false", "--set", "distillation.mode=mean_teacher",
                             "--set", "distillation.ema_decay=0.9", "--set", "baseline={}")
    assert results["distillation"]["mode"] == "mean_teacher" and results["distillation"]["ema_decay"] == 0.9
    for stage in ("distill", "prune", "qat"):
        history = json.loads((run / stage / "history.json").read_text())
        assert "hinton" in history, stage  # the mean teacher taught in every stage
    assert "teacher" not in {m["role"] for m in results["models"]}


@pytest.mark.heavy
def test_mutual_learning_exports_the_chosen_peer_and_keeps_the_others_for_later_stages(tmp_path, capsys):
    run, results, _ = _run(tmp_path, capsys, "dml", "--set", "teacher=null", "--set", "stages.teacher=false", "--set", "distillation.mode=mutual",
                           "--set", "distillation.peers=[{arch: mlp, options: {hidden: [8]}}]",
                           "--set", "distillation.export=1", "--set", "distillation.terms=[{name: hinton, "
                           "weight: 1.0, temperature: 1.0}]", "--set", "distillation.hard_weight=1.0")
    exported = keras.models.load_model(run / "distill" / "student.keras", compile=False)
    kept = keras.models.load_model(run / "distill" / "peers" / "peer_0.keras", compile=False)
    assert exported.get_layer("fc1").units == 8 and kept.get_layer("fc1").units == 16
    for stage in ("distill", "prune", "qat"):
        assert "peer_loss" in json.loads((run / stage / "history.json").read_text()), stage
    assert results["distillation"]["peers"] == "mlp"


def test_two_teachers_of_other_sizes_and_heads_with_a_feature_term(tmp_path, capsys):
    first = _teacher(tmp_path / "a.keras", (12, 12, 1), softmax=False)
    second = _teacher(tmp_path / "b.h5", (16, 16, 1), softmax=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
teacher: {{path: {first}}}
distillation:
  hard_weight: 0.5
  combine: confidence
  extra_teachers: [{{path: {second}}}]
  terms:
    - {{name: hinton, weight: 0.5, temperature: 4.0}}
    - {{name: rkd, weight: 0.1, student_layer: fc1, teacher_layer: feat, distance_weight: 1.0, angle_weight: 2.0}}
stages: {{distill: {{}}, prune: {{}}, qat: {{}}, export: {{}}, benchmark: {{}}, report: {{}}}}
""")
    run, results, _ = _run(tmp_path, capsys, "multi", "--recipe", recipe)
    assert results["distillation"]["teachers"] == 2 and results["distillation"]["combine"] == "confidence"
    for stage in ("distill", "prune", "qat"):
        history = json.loads((run / stage / "history.json").read_text())
        assert {"hinton", "rkd"} <= set(history) and np.isfinite(history["rkd"]).all(), stage


@pytest.mark.heavy
def test_teacher_free_virtual_teacher_with_a_baseline(tmp_path, capsys):
    run, results, _ = _run(tmp_path, capsys, "tfkd", "--set", "teacher=null", "--set", "stages.teacher=false", "--set", "baseline={}",
                           "--set", "distillation.terms=[{name: virtual_teacher, weight: 0.5, correct_prob: 0.9, "
                           "temperature: 20.0}]")
    assert "virtual_teacher" in json.loads((run / "prune" / "history.json").read_text())
    assert {"student", "baseline"} <= {m["role"] for m in results["models"]}
