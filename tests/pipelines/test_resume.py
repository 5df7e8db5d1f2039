"""Resumable runs: finished stages are skipped (from their manifests), changes rerun what depends on them,
Ctrl-C says how to resume, and kill -9 at any moment leaves nothing a later run takes for finished."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import compress

ROOT = Path(__file__).resolve().parents[2]
# teacher.path=null: a teacher stage trains one (the default recipe's teacher is the shipped file), so every stage runs
FAST = ["--limit-train", "600", "--limit-test", "200", "--set", "teacher.path=null", "--teacher-epochs", "1", "--epochs", "1",
        "--set", "prune.epochs=1", "--set", "prune.frequency=2", "--set", "qat.epochs=1",
        "--set", "export.variants=[fp32,int8]", "--set", "benchmark.threads=[1]",
        "--set", "benchmark.min_seconds=0.05", "--set", "benchmark.warmup_seconds=0.01"]
STAGES = ["teacher", "distill", "baseline", "prune", "qat", "export", "benchmark", "bundle", "report"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "pipelines.compress", "--out", str(out), "--run-name", "r", *FAST, *extra]


def _run(out, *extra, timeout=600, cwd=ROOT):
    proc = subprocess.run(_cmd(out, *extra), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _source_copy(dest):
    """A copy of the project's code to edit; `python -m pipelines.compress` run in it imports the copy."""
    for d in ("edge_kd", "pipelines", "models", "recipes"):
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _skipped(stdout):
    return [s for s in STAGES if f"] {s}: finished earlier with the same settings, inputs and code, skipped" in stdout]


def _manifest(run, stage):
    return json.loads((run / "manifests" / f"{stage}.json").read_text())


def _main(capsys, out, *extra):
    """The same command in this process (no second TensorFlow start-up); returns what it printed."""
    code = compress.main(_cmd(out, *extra)[3:])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    return captured.out


@pytest.mark.slow
def test_rerun_skips_and_a_change_reruns_that_stage_and_its_dependents(tmp_path, capsys):
    out = tmp_path / "out"
    run = out / "r"
    first = _main(capsys, out)
    assert _skipped(first) == []
    stamps = {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES}

    again = _main(capsys, out)
    assert _skipped(again) == STAGES  # an unchanged tree reruns nothing
    assert {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES} == stamps

    changed = _main(capsys, out, "--set", "prune.target_sparsity=0.5")
    assert _skipped(changed) == ["teacher", "distill", "baseline"]
    for s in ("prune", "qat", "export", "benchmark", "bundle", "report"):
        assert _manifest(run, s)["fingerprint"] != stamps[s][-64:]
    results = json.loads((run / "results.json").read_text())
    by_name = {m["name"]: m for m in results["models"]}
    assert by_name["pruned-fp32"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by_name["qat-int8"]["sparsity"] == pytest.approx(0.5, abs=0.01)

    # an artefact altered on disk no longer matches its manifest: that stage and its dependents rerun
    student = run / "distill" / "student.keras"
    data = bytearray(student.read_bytes())
    data[len(data) // 2] ^= 0xFF
    student.write_bytes(bytes(data))
    repaired = _main(capsys, out, "--set", "prune.target_sparsity=0.5")
    assert _skipped(repaired) == ["teacher", "baseline"]
    stamps = {s: _manifest(run, s)["finished"] + _manifest(run, s)["fingerprint"] for s in STAGES}

    # a fix to the report's code, run as a real process from an edited copy of the source, reruns the
    # report alone (which stages run which file: test_codehash.py)
    src = _source_copy(tmp_path / "src")
    with open(src / "edge_kd" / "report" / "report.py", "a") as f:
        f.write("\n# a fix\n")
    fixed = _run(out, "--set", "prune.target_sparsity=0.5", cwd=src)
    assert _skipped(fixed) == STAGES[:-1]
    assert _manifest(run, "report")["fingerprint"] != stamps["report"][-64:]


def _wait_for(predicate, proc, limit=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the moment the test waits for: "
                                 + proc.stdout.read()[-2000:] + proc.stderr.read()[-2000:])
        if time.time() - start > limit:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_kill_9_mid_stage_resumes_to_completion(tmp_path):
    out = tmp_path / "out"
    run = out / "r"
    long_distill = ["--epochs", "40", "--set", "baseline.epochs=1"]  # a distill stage long enough to be caught

    # Ctrl-C in the middle of the distill stage: one line, exit 130, the finished teacher kept
    proc = subprocess.Popen(_cmd(out, *long_distill), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(run.glob(".distill.partial-*")), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "python -m pipelines.compress: interrupted during stage 'distill'; finished stages are kept: "
        "rerun the same command to resume at 'distill'")
    assert (run / "manifests" / "teacher.json").is_file() and not (run / "manifests" / "distill.json").exists()
    assert not (run / "distill").exists() and not list(run.glob(".distill.partial-*"))

    # kill -9 in the middle of the same stage: its half-written folder is never taken for finished
    proc = subprocess.Popen(_cmd(out, *long_distill), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(run.glob(".distill.partial-*")), proc)
    time.sleep(1.0)
    proc.kill()
    proc.wait(timeout=60)
    assert list(run.glob(".distill.partial-*")), "the killed stage's working folder should be left behind"
    assert not (run / "distill").exists()

    resumed = _run(out, *long_distill)
    assert _skipped(resumed) == ["teacher"]
    assert not list(run.glob(".*.partial-*"))
    for s in STAGES:
        m = _manifest(run, s)
        assert m["files"] or s == "teacher"
    results = json.loads((run / "results.json").read_text())
    assert [m["name"] for m in results["models"]][-1] == "qat-int8"
    from edge_kd.bench import litert
    from edge_kd import data

    bundle = data.load("fashion_mnist", limit_train=600, limit_test=200)  # the default recipe's data
    x, y = bundle.arrays("test")
    for m in results["models"]:
        if m["format"] == "tflite":
            assert litert.accuracy(run / m["path"], x, y) == pytest.approx(m["accuracy"])
