"""The command line: one-line errors with exit status 2 for user mistakes, and runs of its other recipes and options
(the default run end to end: test_default_run.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_kd.keras import keras
from pipelines import compress, run_keys, run_models, run_training

ROOT = Path(__file__).resolve().parents[2]


def _npz(path, n_train=64, n_test=32, classes=3, shape=(12, 12)):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=np.arange(n_train) % classes, x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=np.arange(n_test) % classes)
    return path


def _teacher(path, input_shape=(12, 12, 1), classes=3, softmax=False, lam=False, nan=False):
    inp = keras.Input(input_shape)
    x = keras.layers.Flatten()(inp)
    if lam:
        x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    out = keras.layers.Dense(classes, activation="softmax" if softmax else None)(x)
    model = keras.Model(inp, out)
    if nan:  # broken weights, as a diverged training saves them
        model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    model.save(path)
    return path


def _run_main(capsys, out, *args):
    try:
        code = compress.main(["--out", str(out), *map(str, args)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def _main_ok(capsys, *args):
    """Runs the command in this process (no second TensorFlow start-up); asserts it succeeded; returns its stdout."""
    code = compress.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    return captured.out


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def small_npz(tmp_path):
    return _npz(tmp_path / "small.npz")


BAD_CASES = {
    "unknown student": (lambda d: ["--data", d["npz"], "--student", "nope"], ["student.arch 'nope' is unknown", "mlp", "resnet8"]),
    "missing data": (lambda d: ["--data", d["tmp"] / "missing.npz"], ["not found"]),
    "corrupt npz": (lambda d: ["--data", d["corrupt_npz"]], ["cannot read"]),
    "npz without keys": (lambda d: ["--data", d["nokeys_npz"]], ["lacks key", "y_test"]),
    "teacher class count": (lambda d: ["--data", d["npz"], "--teacher", d["teacher5"]], ["5 classes", "3"]),
    "teacher channels": (lambda d: ["--data", d["npz"], "--teacher", d["teacher_rgb"]], ["3 channel", "1"]),
    "missing teacher": (lambda d: ["--data", d["npz"], "--teacher", d["tmp"] / "no.keras"], ["teacher file not found"]),
    "corrupt teacher": (lambda d: ["--data", d["npz"], "--teacher", d["corrupt_keras"]], ["cannot load teacher"]),
    "lambda teacher": (lambda d: ["--data", d["npz"], "--teacher", d["lambda_keras"]], ["--trust-teacher"]),
    "teacher with nan weights": (lambda d: ["--data", d["npz"], "--teacher", d["nan_keras"]],
                                 ["nan.keras", "teacher gives outputs that are not finite"]),
    "unreadable image folder": (lambda d: ["--data", d["bad_folder"]], ["cannot read image"]),
    "temperature <= 0": (lambda d: ["--temperature", "0"], ["--temperature", "> 0"]),
    "alpha > 1": (lambda d: ["--alpha", "1.5"], ["--alpha", "[0, 1]"]),
    "alpha < 0": (lambda d: ["--alpha", "-0.1"], ["--alpha"]),
    "unknown tfds": (lambda d: ["--data", "tfds:surely_not_a_dataset_xyz"], ["tfds", "surely_not_a_dataset_xyz"]),
    "bad option value": (lambda d: ["--epochs", "many"], ["--epochs"]),
    # found before anything trains (each used to fail minutes later, or not at all)
    "nan pixels": (lambda d: ["--data", d["nan_npz"]], ["x_train", "not finite", "image 3"]),
    "labels beyond the class names": (lambda d: ["--data", d["badlabel_npz"]], ["labels go up to 4", "3 classes"]),
    "--out under a file": (lambda d: ["--out", d["a_file"] / "runs"], ["--out", "is a file"]),
    "sparsity of one": (lambda d: ["--set", "prune.target_sparsity=1.0"], ["stages.prune.target_sparsity", "(0, 1)"]),
    "two clusters with sparsity kept": (lambda d: ["--set", "cluster.clusters=2"],
                                        ["stages.cluster.clusters", "at least 3"]),
    "fitnet on a missing teacher layer": (
        lambda d: ["--limit-train", "300", "--set", "distillation.terms=[{name: fitnet, student_layer: block2_relu, "
                   "teacher_layer: block9_relu}]"], ["distillation.terms.0 (fitnet)", "block9_relu", "stack1_relu"]),
    "float layer not in the student": (lambda d: ["--limit-train", "300", "--set", "export.variants=[int8, int8_mixed]",
                                                "--set", "export.float_layers=[nope]"],
                                       ["stages.export.float_layers", "'nope'", "block1_conv"]),
    "bundle pick not exported": (lambda d: ["--limit-train", "300", "--set", "bundle.pick=qat-fp16"],
                                 ["stages.bundle.pick", "qat-fp16", "qat-int8"]),
    "bundle pick without validation": (lambda d: ["--limit-train", "300", "--set", "benchmark.validation=false"],
                                       ["stages.bundle", "validation split", "bundle.pick"]),
    "student option of the wrong kind": (lambda d: ["--limit-train", "300", "--set", "student.options.width=wide"],
                                         ["model 'cnn'", "wide"]),
    "prune end beyond the steps": (lambda d: ["--limit-train", "300", "--set", "prune.end_step=100000"],
                                   ["prune.end_step 100000", "training steps"]),
    "student weights of another model": (lambda d: ["--limit-train", "300", "--set", f"student.weights={d['other_h5']}"],
                                         ["student.weights: other.h5 holds no weights of a layer of 'cnn'"]),
    "missing student weights": (lambda d: ["--limit-train", "300", "--set", f"student.weights={d['tmp'] / 'no.h5'}"],
                                ["student.weights: file not found"]),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    d = {"tmp": tmp, "npz": _npz(tmp / "ok.npz")}
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    d["corrupt_npz"] = tmp / "corrupt.npz"
    np.savez(tmp / "nokeys.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4), x_test=np.zeros((4, 8, 8), np.uint8))
    d["nokeys_npz"] = tmp / "nokeys.npz"
    d["teacher5"] = _teacher(tmp / "t5.keras", classes=5)
    d["teacher_rgb"] = _teacher(tmp / "trgb.keras", input_shape=(12, 12, 3))
    (tmp / "corrupt.keras").write_bytes(os.urandom(512))
    d["corrupt_keras"] = tmp / "corrupt.keras"
    d["lambda_keras"] = _teacher(tmp / "lam.keras", lam=True)
    d["nan_keras"] = _teacher(tmp / "nan.keras", nan=True)
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "imgs" / "a" / "ok.png")
    (tmp / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG but truncated")
    d["bad_folder"] = tmp / "imgs"
    x = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    x[3, 2, 2] = np.nan
    np.savez(tmp / "nan.npz", x_train=x, y_train=np.arange(20) % 2, x_test=x[:4] * 0, y_test=np.arange(4) % 2)
    d["nan_npz"] = tmp / "nan.npz"
    np.savez(tmp / "badlabel.npz", x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 5,
             x_test=np.zeros((5, 8, 8), np.uint8), y_test=np.arange(5), class_names=np.array(["a", "b", "c"]))
    d["badlabel_npz"] = tmp / "badlabel.npz"
    (tmp / "a_file").write_text("not a folder")
    d["a_file"] = tmp / "a_file"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="other")]).save_weights(tmp / "other.h5")
    d["other_h5"] = tmp / "other.h5"
    return d


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_user_mistake_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, tmp_path, capsys):
    make_args, needles = BAD_CASES[case]
    out = tmp_path / "out"
    code, err = _run_main(capsys, out, *make_args(bad_inputs))
    _assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_a_diverging_stage_stops_with_one_line_exit_2_and_is_not_recorded(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run_main(capsys, out, "--limit-train", "600", "--limit-test", "100", "--teacher-epochs", "3",
                          "--set", "teacher.path=null", "--set", "teacher.learning_rate=1e30", "--run-name", "nan")
    _assert_one_line_error(code, err, "stage 'teacher'", "loss became nan in epoch 1 of 3", "learning rate")
    run = out / "nan"
    assert not (run / "manifests").exists() and not (run / "teacher").exists()
    assert sorted(p.name for p in run.iterdir()) == [".lock", "recipe.yaml"]  # no partial folder left behind


def test_tfds_without_network_in_a_real_process_is_one_line_on_stderr_and_nothing_else(tmp_path):
    """No traceback and none of tfds', urllib3's or absl's own output (their log records go to the native log)."""
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    proc = subprocess.run([sys.executable, "-m", "pipelines.compress", "--data", "tfds:mnist", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot download tfds dataset 'mnist'" in proc.stderr and "no network?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_a_run_or_search_into_a_folder_another_process_holds_exits_2_at_once_and_writes_nothing(tmp_path):
    from tests.holder import hold

    out = tmp_path / "out"
    for folder, cmd, instead in ((out / "r", ["pipelines.compress", "--run-name", "r"], "another --out or --run-name"),
                                 (out / "search", ["pipelines.search", "--target-accuracy", "0.5"], "another --out")):
        holder = hold(folder, note=f"python -m {cmd[0]}")
        try:
            before = sorted(p.name for p in folder.iterdir())
            proc = subprocess.run([sys.executable, "-m", *cmd, "--out", str(out)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.strip() == (f"python -m {cmd[0]}: error: {folder} is in use by process {holder.pid} "
                                           f"(python -m {cmd[0]}); wait for it to finish, or give {instead}")
            assert sorted(p.name for p in folder.iterdir()) == before
        finally:
            holder.stdin.close()
            holder.wait()


def test_help_documents_every_option():
    text = compress.build_parser().format_help()
    for option in ("--data", "--teacher", "--trust-teacher", "--student", "--epochs", "--temperature", "--alpha",
                   "--out", "--seed", "--teacher-input-range", "--int8-float-io", "--threads"):
        assert option in text


def test_an_image_whose_pixels_do_not_decode_is_a_one_line_error_naming_it(tmp_path):
    from PIL import Image

    from edge_kd.distill import Distiller
    from edge_kd.errors import UserError
    from pipelines import recipe as recipe_mod
    from pipelines.context import Context

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(tmp_path / "imgs" / cls / f"{i}.png")
    broken = tmp_path / "imgs" / "b" / "3.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header reads; the pixels are cut off
    r = recipe_mod.apply_overrides(recipe_mod.load(), [f"data.source={tmp_path / 'imgs'}", "data.test_fraction=0.17",
                                                       "student.arch=mlp", "student.options={}"])
    ctx = Context(r, tmp_path / "out", command="test")
    with pytest.raises(UserError) as info:
        run_training.fit(ctx, Distiller(run_models.build_student(ctx)), 1, 1e-3)
    msg = str(info.value)
    assert "\n" not in msg and "cannot decode image" in msg and str(broken) in msg and "{{" not in msg, msg


@pytest.mark.slow
def test_cli_with_a_users_softmax_h5_teacher_of_another_input_size_and_range(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", n_train=120, n_test=40)
    # the user's teacher: 16×16 inputs on [-1, 1], softmax head, saved as .h5
    inp = keras.Input((16, 16, 1))
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inp))
    keras.Model(inp, out).save(tmp_path / "teacher.h5")
    out_dir = tmp_path / "out"
    stdout = _main_ok(capsys, "--data", data, "--teacher", tmp_path / "teacher.h5", "--teacher-input-range=-1,1",
                      "--student", "mlp", "--epochs", "1", "--threads", "1", "--out", out_dir, "--run-name", "user",
                      "--set", "prune=false", "--set", "qat=false", "--set", "export.variants=[fp32,int8]",
                      "--set", "benchmark.min_seconds=0.2")
    assert "[6/6] report: done" in stdout  # no teacher training step
    results = json.loads((out_dir / "user" / "results.json").read_text())
    assert results["teacher"]["head"] == "softmax" and results["teacher"]["resized"] is True
    assert results["teacher"]["scale"] == pytest.approx(2 / 255) and results["teacher"]["offset"] == -1.0
    teacher_row = results["models"][0]
    assert teacher_row["path"] == str((tmp_path / "teacher.h5").resolve())
    assert teacher_row["size_bytes"] == (tmp_path / "teacher.h5").stat().st_size
    # the exported teacher takes the student's input (12×12, [0, 1]) and gives the original teacher's logits
    from edge_kd.bench import litert

    d = np.load(data)
    x = d["x_test"][..., None].astype(np.float32) / 255
    tfl = litert.TFLiteModel(out_dir / "user" / "tflite" / "teacher-fp32.tflite").predict(x)
    original = keras.models.load_model(tmp_path / "teacher.h5")
    from edge_kd.keras import tf

    probs = original.predict(tf.image.resize(x, (16, 16)).numpy() * 2 - 1, verbose=0)
    np.testing.assert_allclose(tf.nn.softmax(tfl).numpy(), probs, atol=1e-5)


def test_weight_tensor_names_map_back_to_their_keras_layers():
    from edge_kd.bench.stats import layer_of

    assert layer_of("cnn/block1_conv/Conv2D") == "block1_conv"
    assert layer_of("cnn/quant_logits/MatMul;cnn/quant_logits/LastValueQuant/FakeQuantWithMinMaxVars") == "logits"
    assert layer_of("model/prune_low_magnitude_fc1/MatMul") == "fc1"
    assert layer_of("weights") == "weights"


@pytest.mark.slow
@pytest.mark.heavy
def test_optional_clustering_stage_then_pcqat_keeps_sparsity_and_few_weight_values(tmp_path, capsys):
    out = tmp_path / "out"
    stdout = _main_ok(capsys, "--limit-train", "600", "--limit-test", "200", "--epochs", "1", "--threads", "1",
                      "--out", out, "--run-name", "c", "--set", "baseline=false", "--set", "prune.epochs=1",
                      "--set", "prune.frequency=2", "--set", "cluster.clusters=8", "--set", "cluster.epochs=1",
                      "--set", "qat.epochs=1", "--set", "export.variants=[int8]", "--set", "benchmark.min_seconds=0.05",
                      "--set", "benchmark.warmup_seconds=0.01", "--set", "benchmark.rounds=3")
    assert "cluster: cluster to 8 weights per layer while distilling" in stdout
    run = out / "c"
    results = json.loads((run / "results.json").read_text())
    by_name = {m["name"]: m for m in results["models"]}
    assert results["stage_summaries"]["qat"]["scheme"].lower().startswith("cluster")
    for name in ("clustered-int8", "qat-int8"):
        assert by_name[name]["sparsity"] == pytest.approx(0.75, abs=0.01)
        assert set(by_name[name]["sparsity_layers"]) == {"block1_conv", "block2_conv", "block3_conv", "logits"}
    # the clustered Keras kernels hold at most 8 distinct values (one of them the pruned zero)
    clustered = keras.models.load_model(run / "cluster" / "clustered.keras", compile=False)
    for layer in clustered.layers:
        if getattr(layer, "kernel", None) is not None:
            assert len(np.unique(layer.kernel.numpy())) <= 8


def test_the_student_starts_from_its_weights_file_and_the_file_enters_the_fingerprint(tmp_path):
    import models
    from pipelines import recipe as recipe_mod
    from pipelines.context import Context

    keras.utils.set_random_seed(5)
    trained = models.build("cnn", (28, 28, 1), 10, filters=[16, 32, 48])
    trained.save_weights(tmp_path / "w.h5")
    r = recipe_mod.apply_overrides(recipe_mod.load(), [f"student.weights={tmp_path / 'w.h5'}", "data.limit_train=300"])
    ctx = Context(r, tmp_path / "run", "test")
    for a, b in zip(trained.get_weights(), run_models.build_student(ctx).get_weights()):
        np.testing.assert_array_equal(a, b)
    before = run_keys.training_key(ctx)["student_weights"]
    models.build("cnn", (28, 28, 1), 10, filters=[16, 32, 48]).save_weights(tmp_path / "w.h5")  # other weights
    assert run_keys.training_key(Context(r, tmp_path / "run", "test"))["student_weights"] != before
