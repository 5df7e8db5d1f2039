"""edge_kd.compress_model(...): the command's run from a notebook, on in-memory models (tf_keras and Keras 3) and arrays,
resuming when called again with the same models and data."""
import io

import numpy as np

QUICK = ["baseline=false", "prune=false", "qat=false", "distill.epochs=1", "export.variants=[int8]",
         "benchmark.threads=[1]", "benchmark.min_seconds=0.05", "benchmark.warmup_seconds=0.01", "benchmark.rounds=3",
         "benchmark.layer_error_samples=16"]


def _student():
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="s_conv")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="s_gap")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="s_logits")(h))


def test_a_notebook_run_from_arrays_and_in_memory_models_resumes_when_called_again(teacher, tmp_path):
    import edge_kd
    from edge_kd import data

    b = data.load("mnist", limit_train=400, limit_test=100, seed=0)
    arrays = (b.raw("train"), b.labels("train"), b.raw("test"), b.labels("test"))
    first = io.StringIO()
    result = edge_kd.compress_model(teacher=teacher, student=_student(), data=arrays, overrides=QUICK, out=tmp_path,
                              name="nb", stream=first)
    assert result.run_dir == tmp_path / "nb" and result.report.is_file() and result.bundle.is_dir()
    assert result.row("student-int8").size_bytes > 0
    assert result.row("teacher").accuracy > 0.5  # the shared teacher of the unit tests, on these images
    assert "skipped" not in first.getvalue()

    # the same cell again: equal models (a fresh Keras 3 object of the same weights) and arrays, nothing retrained
    again = io.StringIO()
    arrays = tuple(np.copy(a) for a in arrays)
    edge_kd.compress_model(teacher=teacher, student=_student(), data=arrays, overrides=QUICK, out=tmp_path, name="nb",
                     stream=again)
    stages = len(result.results["stages"])
    assert again.getvalue().count("finished earlier with the same settings, inputs and code, skipped") == stages
    assert len(list((tmp_path / ".inputs").iterdir())) == 3  # teacher, student and data, each written once
