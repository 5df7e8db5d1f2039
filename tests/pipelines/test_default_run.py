"""The default recipe end to end, run once as a real command on a slice of the built-in data (``default_run``), and
what every run must give: its report, files and bundle; finished stages skipped and changes rerun; a stage stopped at
any moment (kill -9, Ctrl-C) resumed at the epoch it reached, ending as the uninterrupted run did. Ctrl-C at other
points of a command: test_ctrl_c.py.

Every interruption is sent at a point the test chooses (a callback, a hook, a saved epoch), never after a sleep.
"""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines import compress

ROOT = Path(__file__).resolve().parents[2]
# Two epochs in every training stage, so that each can be stopped after its first.
ARGS = ["--run-name", "r", "--limit-train", "1000", "--limit-test", "300", "--epochs", "2", "--threads", "1",
        "--set", "prune.epochs=2", "--set", "prune.frequency=2", "--set", "qat.epochs=2",
        "--set", "benchmark.min_seconds=0.2", "--set", "benchmark.warmup_seconds=0.1",
        "--set", "benchmark.layer_error_samples=32"]
STAGES = ["distill", "baseline", "prune", "qat", "export", "benchmark", "bundle", "report"]
TRAINED = {"distill": "distill/student.keras", "baseline": "baseline/baseline.keras", "prune": "prune/pruned.keras"}
RESUME = "python -m pipelines.compress: interrupted during stage '{0}'; finished stages and epochs are kept: rerun " \
         "the same command to resume at '{0}'"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``python -m pipelines.compress`` with the default recipe on a slice, once: (its run folder, its stdout)."""
    out = tmp_path_factory.mktemp("default")
    proc = subprocess.run([sys.executable, "-m", "pipelines.compress", "--out", str(out), *ARGS], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "r", proc.stdout


def _main(capsys, out, *extra, expect=0):
    """The command in this process (no second TensorFlow start-up); returns (stdout, stderr)."""
    code = compress.main(["--out", str(out), *ARGS, *extra])
    captured = capsys.readouterr()
    assert code == expect, captured.out[-3000:] + captured.err[-3000:]
    return captured.out, captured.err


def _skipped(stdout):
    return [s for s in STAGES if f"] {s}: finished earlier with the same settings, inputs and code, skipped" in stdout]


def _manifest(run, stage):
    return json.loads((run / "manifests" / f"{stage}.json").read_text())


def _copy(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out / "r")
    return out


def _weights_equal(a_file, b_file):
    from edge_kd.keras import keras

    a, b = (keras.models.load_model(f, compile=False).get_weights() for f in (a_file, b_file))
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _hook_stage(monkeypatch, stage, act):
    """Patches edge_kd.train.fit so that the fit of stage ``stage`` calls ``act(epoch, batch)`` after each of its
    training batches."""
    from edge_kd import interrupt, train
    from edge_kd.keras import keras

    real = train.fit

    class Hook(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            act(self.epoch, batch)

    def fit(model, data, epochs, learning_rate, callbacks=(), **kw):
        if interrupt.where() == f"stage '{stage}'":
            callbacks = [*callbacks, Hook()]
        return real(model, data, epochs, learning_rate, callbacks=callbacks, **kw)

    monkeypatch.setattr(train, "fit", fit)


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)


class _SigintInFinaliser:
    """An object whose finaliser sends Ctrl-C: the KeyboardInterrupt is raised inside ``__del__``, where Python only
    reports it, the way one raised in a callback TensorFlow calls can be lost."""

    def __del__(self):
        _sigint()


@pytest.mark.slow
def test_the_default_recipe_end_to_end_with_the_shipped_teacher(default_run):
    run, stdout = default_run
    assert "[8/8] report: done" in stdout  # the default teacher is the shipped file: no teacher stage
    results = json.loads((run / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    variants = ["fp32", "fp16", "dynamic", "dynamic_compat", "int8", "int8_mixed"]
    assert names == ["teacher", "student", "baseline", "teacher-fp32", *[f"student-{v}" for v in variants],
                     *[f"pruned-{v}" for v in variants], "qat-int8"]
    # pruning reached its target, as measured on the exported weights; PQAT kept the zeros through int8
    by_name = {m["name"]: m for m in results["models"]}
    assert by_name["pruned-fp32"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert by_name["qat-int8"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert by_name["student-fp32"]["sparsity"] < 0.05
    assert "prune.epochs=2" in (run / "recipe.yaml").read_text().splitlines()[0]
    shipped = by_name[results["bundle"]["model"]]  # the report's answer, also the last lines on the terminal
    assert (f"- Ship bundle/{shipped['name']}.tflite: {shipped['size_bytes']:,} bytes, "
            f"{100 * shipped['accuracy']:.2f} % top-1 on the test set") in stdout
    assert (f"Picked on the validation split, never the test split: the smallest file within 0.5 pp of the best "
            f"student file's validation accuracy, integer ones first (its own: "
            f"{100 * shipped['val_accuracy']:.2f} %).") in stdout
    assert "- Against the teacher (teacher-fp32, " in stdout and "- Distillation: " in stdout and " pp over the same student trained alone (" in stdout
    assert (run / "bundle" / f"{shipped['name']}.tflite").is_file()
    from edge_kd.bench import litert

    d = np.load(ROOT / "edge_kd" / "_data" / "fashion_mnist.npz")
    for m in results["models"]:
        assert (run / m["path"]).is_file()
        assert m["size_bytes"] == (run / m["path"]).stat().st_size
        assert 0 < m["gzip_bytes"] < m["size_bytes"] * 1.1
        assert m["input_scale"] == pytest.approx(1 / 255) and m["input_offset"] == 0.0
        assert m["role"] in ("teacher", "student", "baseline") and m["format"] in ("keras", "tflite")
        assert 0.0 <= m["accuracy"] <= 1.0
        if m["format"] == "tflite":
            assert m["latency"]["1"]["runs"] >= 50 and m["latency"]["1"]["rounds"] == 10
            assert m["min_runtime"] and m["op_versions"] and m["memory"]["peak_bytes"] > 0
            # the integer files carry each layer's error against float; the float ones none
            assert (m["layer_error"] is not None) == (m["variant"] in ("int8", "int8_mixed"))
            # the reported accuracy is reproduced by an independent LiteRT run on the same test images
            x = d["x_test"][..., None].astype(np.float32) * m["input_scale"] + m["input_offset"]
            keep = np.sort(np.random.default_rng(1).permutation(len(x))[:300])
            assert litert.accuracy(run / m["path"], x[keep], d["y_test"][keep]) == pytest.approx(m["accuracy"])
    from edge_kd.bench.compat import version_key

    assert by_name["student-dynamic"]["min_runtime"] == "2.17.0"
    assert version_key(by_name["student-dynamic_compat"]["min_runtime"]) < version_key("2.14")
    assert len(by_name["student-int8_mixed"]["float_layers"]) == 1  # float_worst: 1, chosen on validation images
    student_int8 = by_name["student-int8"]
    assert student_int8["size_bytes"] * 10 <= next(m for m in results["models"] if m["name"] == "teacher-fp32")["size_bytes"]
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["name"] for r in rows] == names
    report = (run / "report.md").read_text()
    assert all(n in report for n in names)
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "layer_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Per-layer quantization error" in report and "Where each file runs" in report
    assert not list(run.glob(".*.partial-*")) and not (run / ".resume").exists()
    assert (run / "native.log").is_file()  # TensorFlow's own log lines, not on the terminal
    # the bundle holds the model the report names, and verifies against its golden outputs
    from pipelines import verify

    assert verify.main([str(run / "bundle")]) == 0
    bundled = json.loads((run / "bundle" / "manifest.json").read_text())
    assert bundled["measured"]["name"] == results["bundle"]["model"]
    assert bundled["min_runtime_version"] == by_name[bundled["measured"]["name"]]["min_runtime"]
    assert bundled["measured"]["peak_memory_bytes"] == by_name[bundled["measured"]["name"]]["memory"]["peak_bytes"]
    assert (run / "bundle" / "labels.txt").read_text().splitlines()[:2] == ["T-shirt/top", "Trouser"]
    assert results["teacher"]["trained_by"] == "edge-kd, shipped (builtin:fashion_mnist)" and results["teacher"]["file"].endswith(
        "fashion_mnist_resnet8w2.keras")
    for stage in ("distill", "baseline", "prune", "qat", "export", "benchmark", "bundle", "report"):
        assert json.loads((run / "manifests" / f"{stage}.json").read_text())["files"]


@pytest.mark.slow
def test_a_stage_stopped_after_any_epoch_resumes_there_and_ends_as_the_uninterrupted_run(default_run, tmp_path, capsys,
                                                                                       monkeypatch):
    reference, _ = default_run
    out = tmp_path / "out"
    run = out / "r"
    cheap = ["--set", "export.variants=[int8]"]  # the same training stages; export and benchmark kept short
    # kill -9, in a real process, right after the distill stage saved its first epoch
    proc = subprocess.run([sys.executable, "-m", "tests.pipelines.faults", "kill", "distill", "1", "--", "compress",
                           "--out", str(out), *ARGS, *cheap], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = json.loads((run / ".resume" / "distill" / "state.json").read_text())
    assert saved["epochs"] == 1 and saved["seconds"] > 0
    earlier = {"distill": saved["seconds"]}  # the killed sitting's work, counted in the stage's time when it ends
    assert list(run.glob(".distill.partial-*")) and not (run / "manifests" / "distill.json").exists()

    # then Ctrl-C in the second epoch of prune (raised in a finaliser, where Python swallows it) and of QAT; each
    # rerun resumes the stage stopped before
    before = "distill"
    for stage, how in (("prune", "finaliser"), ("qat", "plain")):
        def act(epoch, batch, how=how):
            if epoch == 1 and batch == 1:
                if how == "finaliser":
                    _SigintInFinaliser()  # dropped at once: its __del__ runs here
                else:
                    _sigint()

        _hook_stage(monkeypatch, stage, act)
        stdout, err = _main(capsys, out, *cheap, expect=130)
        monkeypatch.undo()
        assert f"] {before}: " in stdout and "(resumed after epoch 1) ..." in stdout
        assert err.strip().splitlines()[-1] == RESUME.format(stage) + ", after its epoch 1"
        assert (run / "manifests" / f"{before}.json").is_file() and not (run / ".resume" / before).exists()
        assert not (run / "manifests" / f"{stage}.json").exists() and not list(run.glob(f".{stage}.partial-*"))
        saved = json.loads((run / ".resume" / stage / "state.json").read_text())
        assert saved["epochs"] == 1 and saved["seconds"] > 0
        earlier[stage] = saved["seconds"]
        assert re.search(rf"\] {before}: done in [\d.]+ s \([\d.]+ s of it in earlier sittings\)\n", stdout)
        before = stage

    stdout, _ = _main(capsys, out, *cheap)
    assert "] qat: quantization-aware training while distilling (2 epochs) (resumed after epoch 1) ..." in stdout
    assert not (run / ".resume").exists() and not list(run.glob(".*.partial-*"))
    # each resumed stage's time counts the epochs its stopped sitting saved
    assert all(_manifest(run, stage)["seconds"] > seconds for stage, seconds in earlier.items())
    # the weights and histories of the run never stopped; the files made from them measure the same
    for stage, file in TRAINED.items():
        assert _weights_equal(run / file, reference / file), stage
    for stage in ("distill", "baseline", "prune", "qat"):
        assert (json.loads((run / stage / "history.json").read_text())
                == json.loads((reference / stage / "history.json").read_text())), stage
    ours = {m["name"]: m["accuracy"] for m in json.loads((run / "results.json").read_text())["models"]}
    theirs = {m["name"]: m["accuracy"] for m in json.loads((reference / "results.json").read_text())["models"]}
    assert ours == {name: theirs[name] for name in ours}
    again, _ = _main(capsys, out, *cheap)  # recorded as any run's stages are
    assert _skipped(again) == STAGES


@pytest.mark.slow
def test_a_rerun_skips_what_is_finished_and_reruns_a_changed_stage_and_what_reads_it(default_run, tmp_path, capsys):
    out = _copy(default_run[0], tmp_path)
    run = out / "r"
    stamps = {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES}

    again, _ = _main(capsys, out)
    assert _skipped(again) == STAGES  # an unchanged tree reruns nothing
    assert {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES} == stamps

    # a file altered on disk no longer matches its manifest: that stage reruns (the bundle's model: its stage alone
    # runs again, and makes the very files it made, so the report that reads them stands)
    model = next((run / "bundle").glob("*.tflite"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    repaired, _ = _main(capsys, out)
    assert _skipped(repaired) == [s for s in STAGES if s != "bundle"]
    assert _manifest(run, "bundle")["files"] == _manifest(default_run[0], "bundle")["files"]  # made whole again

    # a fix to the report's code, run as a real process from an edited copy of the source, reruns the
    # report alone (which stages run which file: test_codehash.py); a changed setting: the converter test above
    src = tmp_path / "src"
    for d in ("edge_kd", "pipelines", "models"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "edge_kd" / "report" / "report.py", "a") as f:
        f.write("\n# a fix\n")
    report_before = _manifest(run, "report")["fingerprint"]
    # the shipped teacher as this checkout resolves it: the copy's own would be another path in the recorded recipe
    shipped = ROOT / "edge_kd" / "_data" / "teachers" / "fashion_mnist_resnet8w2.keras"
    proc = subprocess.run([sys.executable, "-m", "pipelines.compress", "--out", str(out), *ARGS, "--teacher",
                           str(shipped)], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _skipped(proc.stdout) == STAGES[:-1]
    assert _manifest(run, "report")["fingerprint"] != report_before
