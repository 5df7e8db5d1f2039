"""Resumable runs: finished stages are skipped (from their manifests), changes rerun what depends on them, a stage
stopped at any moment (Ctrl-C, kill -9) resumes at the epoch it had reached and ends as an uninterrupted run does,
and Ctrl-C anywhere (a training callback, the TFLite converter, the LiteRT loop) ends the command with exit 130 and
one line that says how to resume.

One uninterrupted run (``reference``) is made once; the other tests compare with it or work on copies of it. Every
interruption is sent at a point the test chooses (a callback, a hook), never after a sleep.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines import compress

ROOT = Path(__file__).resolve().parents[2]
# teacher.path=null: a teacher stage trains one (the default recipe's teacher is the shipped file), so every stage
# runs; two epochs in every training stage, so each can be stopped after its first
FAST = ["--limit-train", "600", "--limit-test", "200", "--set", "teacher.path=null", "--teacher-epochs", "2",
        "--epochs", "2", "--set", "prune.epochs=2", "--set", "prune.frequency=2", "--set", "qat.epochs=2",
        "--set", "export.variants=[int8]", "--set", "benchmark.threads=[1]",
        "--set", "benchmark.min_seconds=0.05", "--set", "benchmark.warmup_seconds=0.01", "--set", "benchmark.rounds=3"]
STAGES = ["teacher", "distill", "baseline", "prune", "qat", "export", "benchmark", "bundle", "report"]
TRAINED = {"teacher": "teacher/teacher.keras", "distill": "distill/student.keras", "baseline": "baseline/baseline.keras",
           "prune": "prune/pruned.keras"}
RESUME = "python -m pipelines.compress: interrupted during stage '{0}'; finished stages and epochs are kept: rerun " \
         "the same command to resume at '{0}'"


def _args(out, *extra):
    return ["--out", str(out), "--run-name", "r", *FAST, *extra]


def _main(capsys, out, *extra, expect=0):
    """The command in this process (no second TensorFlow start-up); returns (stdout, stderr)."""
    code = compress.main(_args(out, *extra))
    captured = capsys.readouterr()
    assert code == expect, captured.out[-3000:] + captured.err[-3000:]
    return captured.out, captured.err


def _skipped(stdout):
    return [s for s in STAGES if f"] {s}: finished earlier with the same settings, inputs and code, skipped" in stdout]


def _manifest(run, stage):
    return json.loads((run / "manifests" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run folder of one uninterrupted run of FAST."""
    out = tmp_path_factory.mktemp("reference")
    assert compress.main(_args(out)) == 0
    return out / "r"


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
def test_a_stage_stopped_after_any_epoch_resumes_there_and_ends_as_an_uninterrupted_run(reference, tmp_path,
                                                                                      capsys, monkeypatch):
    out = tmp_path / "out"
    run = out / "r"
    # kill -9, in a real process, right after the teacher stage saved its first epoch
    proc = subprocess.run([sys.executable, "-m", "tests.pipelines.faults", "kill", "teacher", "1", "--",
                           *_args(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((run / ".resume" / "teacher" / "state.json").read_text())["epochs"] == 1
    assert list(run.glob(".teacher.partial-*")) and not (run / "manifests" / "teacher.json").exists()

    # then Ctrl-C in each later training stage, in its second epoch: the rerun resumes the stage stopped before
    stops = {"distill": "finaliser", "prune": "plain", "qat": "plain"}  # the baseline between runs as distill does
    before = "teacher"
    for stage, how in stops.items():
        def act(epoch, batch, how=how):
            if epoch == 1 and batch == 1:
                if how == "finaliser":
                    _SigintInFinaliser()  # swallowed where it is raised; honoured at the next batch end
                else:
                    _sigint()

        _hook_stage(monkeypatch, stage, act)
        stdout, err = _main(capsys, out, expect=130)
        monkeypatch.undo()
        assert f"] {before}: " in stdout and "(resumed after epoch 1) ..." in stdout
        assert err.strip().splitlines()[-1] == RESUME.format(stage) + ", after its epoch 1"
        assert (run / "manifests" / f"{before}.json").is_file() and not (run / ".resume" / before).exists()
        assert not (run / "manifests" / f"{stage}.json").exists() and not list(run.glob(f".{stage}.partial-*"))
        assert json.loads((run / ".resume" / stage / "state.json").read_text())["epochs"] == 1
        before = stage

    stdout, _ = _main(capsys, out)
    assert "] qat: quantization-aware training while distilling (2 epochs) (resumed after epoch 1) ..." in stdout
    assert not (run / ".resume").exists() and not list(run.glob(".*.partial-*"))
    # the same weights and histories as the run never stopped; records as any run's: a rerun skips every stage
    assert _manifest(run, "teacher")["fingerprint"] == _manifest(reference, "teacher")["fingerprint"]
    for stage in STAGES[:5]:
        assert (json.loads((run / stage / "history.json").read_text())
                == json.loads((reference / stage / "history.json").read_text()))
    for stage, file in TRAINED.items():
        assert _weights_equal(run / file, reference / file), stage
    ours = {m["name"]: m["accuracy"] for m in json.loads((run / "results.json").read_text())["models"]}
    assert ours == {m["name"]: m["accuracy"] for m in json.loads((reference / "results.json").read_text())["models"]}
    again, _ = _main(capsys, out)
    assert _skipped(again) == STAGES


@pytest.mark.slow
def test_ctrl_c_in_the_tflite_converter_or_the_litert_loop_ends_the_stage_with_130(reference, tmp_path, capsys,
                                                                                    monkeypatch):
    from edge_kd.bench import litert
    from edge_kd.export import tflite

    out = _copy(reference, tmp_path)
    run = out / "r"
    again = ["--set", "export.variants=[int8,dynamic]"]  # export and what follows it rerun; training does not

    real_rep = tflite._representative_dataset

    def representative(samples):  # the generator the converter's calibration loop calls into
        def gen():
            for i, item in enumerate(real_rep(samples)()):
                if i == 3:
                    _sigint()
                yield item

        return gen

    monkeypatch.setattr(tflite, "_representative_dataset", representative)
    _, err = _main(capsys, out, *again, expect=130)
    assert err.strip().splitlines()[-1] == RESUME.format("export")
    assert _manifest(run, "export")["fingerprint"] == _manifest(reference, "export")["fingerprint"]  # not replaced
    assert not list(run.glob(".export.partial-*"))
    monkeypatch.undo()

    real_invoker = litert._invoker

    def invoker(path, sample, threads, clock):
        invoke, calls = real_invoker(path, sample, threads, clock), []

        def counted():
            calls.append(1)
            if len(calls) == 20:
                _sigint()
            invoke()

        return counted

    monkeypatch.setattr(litert, "_invoker", invoker)
    stdout, err = _main(capsys, out, *again, expect=130)
    assert "] export: done" in stdout
    assert err.strip().splitlines()[-1] == RESUME.format("benchmark")
    assert _manifest(run, "benchmark")["fingerprint"] == _manifest(reference, "benchmark")["fingerprint"]
    assert not list(run.glob(".benchmark.partial-*"))


@pytest.mark.slow
def test_rerun_skips_and_a_change_reruns_that_stage_and_its_dependents(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    run = out / "r"
    stamps = {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES}

    again, _ = _main(capsys, out)
    assert _skipped(again) == STAGES  # an unchanged tree reruns nothing
    assert {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES} == stamps

    changed, _ = _main(capsys, out, "--set", "prune.target_sparsity=0.5")
    assert _skipped(changed) == ["teacher", "distill", "baseline"]
    for s in ("prune", "qat", "export", "benchmark", "bundle", "report"):
        assert _manifest(run, s)["fingerprint"] != stamps[s][-64:]
    results = json.loads((run / "results.json").read_text())
    by_name = {m["name"]: m for m in results["models"]}
    assert by_name["pruned-int8"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by_name["qat-int8"]["sparsity"] == pytest.approx(0.5, abs=0.01)

    # an artefact altered on disk no longer matches its manifest: that stage and its dependents rerun
    model = run / "qat" / "qat.keras"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    repaired, _ = _main(capsys, out, "--set", "prune.target_sparsity=0.5")
    assert _skipped(repaired) == ["teacher", "distill", "baseline", "prune"]

    # a fix to the report's code, run as a real process from an edited copy of the source, reruns the
    # report alone (which stages run which file: test_codehash.py)
    src = tmp_path / "src"
    for d in ("edge_kd", "pipelines", "models", "recipes"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "edge_kd" / "report" / "report.py", "a") as f:
        f.write("\n# a fix\n")
    report_before = _manifest(run, "report")["fingerprint"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.compress", *_args(out, "--set", "prune.target_sparsity=0.5")],
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _skipped(proc.stdout) == STAGES[:-1]
    assert _manifest(run, "report")["fingerprint"] != report_before
